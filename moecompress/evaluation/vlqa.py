"""Visual question answering by exact match of the greedy answer (reference: moe-tiny-vl on shapes-vl).

Input: a jsonl file, one item per line: `image` (path relative to the file), `question`, and `answer` (or
`answers`, a list of accepted answers, VQA-style); an optional `qtype` groups the accuracy. Answers match
after lower-casing and stripping spaces and a final full stop.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..calibration.data import DEFAULT_VL_TEMPLATES, read_vl_items
from ..errors import CalibrationDataError

QUESTION_PROMPT = DEFAULT_VL_TEMPLATES["question"].split("{answer}")[0].rstrip()


@dataclass
class VLQAResult:
    data: str
    accuracy: float
    items: int
    accuracy_by_type: dict[str, float] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _normalize(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def accepted_answers(item: dict) -> list[str]:
    answers = item.get("answers") or ([item["answer"]] if "answer" in item else [])
    return [_normalize(a) for a in answers]


@torch.no_grad()
def vl_qa_accuracy(
    model,
    processor,
    source: str,
    batch_size: int = 32,
    max_items: int | None = None,
    max_new_tokens: int = 6,
    prompt: str = QUESTION_PROMPT,
    progress: bool = True,
) -> VLQAResult:
    items = read_vl_items(source)[:max_items]
    for n, item in enumerate(items, 1):
        if "question" not in item or not accepted_answers(item):
            raise CalibrationDataError(
                f"{source}: item {n} needs 'question' and 'answer' (or 'answers') fields next to 'image' to be scored."
            )
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    correct: dict[str, list[bool]] = defaultdict(list)
    examples = []
    for start in tqdm(range(0, len(items), batch_size), desc="vl-qa", disable=not progress):
        batch = items[start : start + batch_size]
        images = [Image.open(item["image"]).convert("RGB") for item in batch]
        texts = [prompt.format(**item) for item in batch]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for item, answer in zip(batch, answers):
            hit = _normalize(answer) in accepted_answers(item)
            correct[item.get("qtype", "all")].append(hit)
            if len(examples) < 12:
                examples.append(
                    {"question": item["question"], "answer": accepted_answers(item)[0], "generated": answer.strip()}
                )
    flat = [h for hits in correct.values() for h in hits]
    return VLQAResult(
        source, sum(flat) / len(flat), len(flat), {k: sum(v) / len(v) for k, v in correct.items()}, examples
    )
