"""Offline multiple-choice tasks built deterministically from the local evaluation text (../shared/data).

Each item: a context and four continuations, the true one and three taken from other places in the same
corpus, so a model that has learned the text ranks the true continuation first. The items are made at load
time from the raw files; nothing derived from the data is stored in the repository.
"""

from __future__ import annotations

import datasets

CHOICES = 4
MAX_ITEMS = 400


def _items(pairs: list[tuple[str, str]]) -> datasets.Dataset:
    """(context, true continuation) pairs -> items with 3 distinct distractors drawn at fixed strides, answer rotated."""
    n, items = len(pairs), []
    if len({target for _, target in pairs}) < CHOICES:
        raise ValueError(f"only {n} distinct continuations; a {CHOICES}-way task needs at least {CHOICES}")
    strides = [n // 4 + 1, n // 2 + 3, 3 * n // 4 + 5, *range(1, n)]
    for i, (context, target) in enumerate(pairs[:MAX_ITEMS]):
        distractors = []
        for stride in strides:
            candidate = pairs[(i + stride) % n][1]
            if candidate != target and candidate not in distractors:
                distractors.append(candidate)
            if len(distractors) == CHOICES - 1:
                break
        label = i % CHOICES
        choices = distractors[:label] + [target] + distractors[label:]
        items.append({"context": context, "choices": choices, "label": label})
    return datasets.Dataset.from_list(items)


def wiki_pairs(dataset: datasets.Dataset) -> datasets.Dataset:
    """WikiText paragraphs of 60+ words: the first two thirds as context, the next 12 words as the answer."""
    pairs = []
    for line in dataset["text"]:
        words = line.split()
        if len(words) < 60 or line.lstrip().startswith("="):
            continue
        cut = 2 * len(words) // 3
        pairs.append((" ".join(words[:cut]), " " + " ".join(words[cut : cut + 12])))
    return _items(pairs)


def code_pairs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Source files: 12 lines of context, the next non-trivial line (20+ characters) as the answer."""
    pairs = []
    for text in dataset["text"]:
        lines = text.split("\n")
        for start in range(0, len(lines) - 13, 25):
            target = lines[start + 12]
            if len(target.strip()) >= 20:
                pairs.append(("\n".join(lines[start : start + 12]) + "\n", target))
    return _items(pairs)
