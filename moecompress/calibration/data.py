"""Calibration and evaluation data: text jsonl/txt files, hub datasets, image+text jsonl for VL models."""

from __future__ import annotations

import json
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CalibrationDataError

DEFAULT_VL_TEMPLATES = {
    "caption": "<|vision_start|><|image_pad|><|vision_end|>Caption: {caption}",
    "question": "<|vision_start|><|image_pad|><|vision_end|>Question: {question} Answer: {answer}",
}


@dataclass
class CalibrationBatch:
    """Model inputs for one forward pass; `image_mask` [B, T] marks image tokens; `source`: the recipe key of the
    data it came from (calibration.dataset or vl_dataset)."""

    inputs: dict[str, torch.Tensor]
    image_mask: torch.Tensor = field(default=None)
    source: str = "dataset"

    @property
    def num_tokens(self) -> int:
        return int(self.inputs["input_ids"].numel())


def read_texts(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    """Documents from a .jsonl file (one {"text": ...} per line), a plain-text file, or a hub dataset name."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".json":
            return _json_texts(path, text_field)
        if not is_json_lines(path):
            return [read_text_file(path)]
        texts = []
        for line_no, line in enumerate(read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CalibrationDataError(
                    f"{source}:{line_no}: expected a JSON object with a '{text_field}' field ({exc})."
                ) from exc
            if not isinstance(text, str):
                raise CalibrationDataError(f"{source}:{line_no}: '{text_field}' must be a string, got {text!r}.")
            texts.append(text)
        return texts
    if path.exists():
        raise CalibrationDataError(f"data path '{source}' is a folder; pass a .jsonl or .txt file.")
    if path.suffix.lower() in (".jsonl", ".txt", ".json") or source.startswith((".", "/", "~")):
        raise CalibrationDataError(f"data file '{source}' does not exist.")
    return _hub_texts(source, text_field, split)


def is_json_lines(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _json_texts(path: Path, text_field: str) -> list[str]:
    """A .json file: a list of strings or of objects with a `text_field` string."""
    try:
        data = json.loads(read_text_file(path))
    except json.JSONDecodeError:
        data = None
    items = data if isinstance(data, list) else []
    texts = [item.get(text_field) if isinstance(item, dict) else item for item in items]
    if not isinstance(data, list) or not all(isinstance(t, str) for t in texts):
        raise CalibrationDataError(
            f"{path}: expected a JSON list of strings or of objects with a '{text_field}' string; "
            "or pass a .jsonl / .txt file."
        )
    return [t for t in texts if t]


def read_text_file(path: Path) -> str:
    """A UTF-8 text file; a binary or otherwise encoded file is a clear error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(
            f"'{path}' is not UTF-8 text (byte {exc.start}); pass a UTF-8 .txt or .jsonl file."
        ) from None
    except OSError as exc:
        raise CalibrationDataError(f"cannot read '{path}': {exc.strerror}.") from None


def _hub_texts(name: str, text_field: str, split: str) -> list[str]:
    try:
        import datasets

        config = None
        if ":" in name:
            name, config = name.split(":", 1)
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types for a missing/offline dataset
        raise CalibrationDataError(
            f"could not load hub dataset '{name}' ({type(exc).__name__}: {exc}). Pass a local .jsonl/.txt file, "
            "or a dataset id reachable from this machine (name or name:config)."
        ) from exc
    if text_field not in dataset.column_names:
        raise CalibrationDataError(f"dataset '{name}' has no '{text_field}' column; columns: {dataset.column_names}.")
    return [t for t in dataset[text_field] if t]


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """Documents tokenized and joined with the EOS token (how the reference models were trained)."""
    eos = tokenizer.eos_token_id
    ids = array("q")  # 8 bytes a token; a list of Python ints takes 36 (0.4 GB for 10 M calibration tokens)
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.frombuffer(ids, dtype=torch.long).clone() if ids else torch.empty(0, dtype=torch.long)


def window_counts_problem(s, where: str) -> str | None:
    """Why a data section's (calibration, recovery, slim) window counts cannot be used, or None."""
    if s.num_samples < 1 or s.batch_size < 1 or s.seq_len < 2 or s.vl_num_samples < 0:
        return f"{where}: num_samples and batch_size must be >= 1, seq_len >= 2, vl_num_samples >= 0"
    return None


def text_calibration_batches(
    source: str,
    tokenizer,
    num_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> list[CalibrationBatch]:
    """`num_samples` windows of `seq_len` tokens drawn at random (seeded) from the joined documents."""
    texts = read_texts(source)
    random.Random(seed).shuffle(texts)
    stream = token_stream(texts, tokenizer)
    windows = len(stream) // seq_len
    if windows == 0:
        raise CalibrationDataError(f"'{source}' has {len(stream)} tokens, fewer than one window of {seq_len}.")
    picks = sorted(random.Random(seed).sample(range(windows), min(num_samples, windows)))
    rows = torch.stack([stream[i * seq_len : (i + 1) * seq_len] for i in picks])
    return [
        CalibrationBatch(
            {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}, torch.zeros_like(chunk, dtype=torch.bool)
        )
        for chunk in rows.split(batch_size)
    ]


def read_vl_items(source: str) -> list[dict]:
    path = Path(source).expanduser()
    if not path.is_file():
        raise CalibrationDataError(f"vision-language data file '{source}' does not exist.")
    items = []
    for line_no, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(f"{source}:{line_no}: not a JSON object ({exc}).") from None
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise CalibrationDataError(f"{source}:{line_no}: an image+text item needs an 'image' field (a file path).")
        image = (path.parent / item["image"]).resolve()
        if not image.is_file():
            raise CalibrationDataError(
                f"{source}:{line_no}: image '{item['image']}' does not exist (paths are relative to the file)."
            )
        item["image"] = str(image)
        items.append(item)
    if not items:
        raise CalibrationDataError(
            f"vision-language data file '{source}' holds no items; give one JSON object per line."
        )
    return items


def vl_calibration_batches(
    source: str, processor, image_mask, num_samples: int = 128, seed: int = 0, templates: dict | None = None
) -> list[CalibrationBatch]:
    """One batch per image+text item; captions and question/answer pairs alternate. `image_mask(input_ids)`: the
    model's image tokens (the adapter's `image_token_mask`)."""
    from PIL import Image

    templates = templates or DEFAULT_VL_TEMPLATES
    items = read_vl_items(source)
    random.Random(seed).shuffle(items)
    batches = []
    for i, item in enumerate(items[:num_samples]):
        kind = "question" if (i % 2 and "question" in item) or "caption" not in item else "caption"
        try:
            prompt = templates[kind].format(**item)
            with Image.open(item["image"]) as image:
                inputs = dict(processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt"))
        except (OSError, KeyError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise CalibrationDataError(f"{source}: item {item['image']}: {type(exc).__name__}: {exc}.") from None
        batches.append(CalibrationBatch(inputs, image_mask(inputs["input_ids"]), source="vl_dataset"))
    return batches
