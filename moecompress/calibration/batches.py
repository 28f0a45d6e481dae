"""Calibration and training batches for a loaded model: its tokenizer or processor, text windows and, for
vision-language models, image+text items."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ..errors import CalibrationDataError, ModelLoadError
from .data import CalibrationBatch, text_calibration_batches, vl_calibration_batches

if TYPE_CHECKING:
    from ..models import LoadedModel
    from ..recipe import CalibrationConfig, Recipe
    from ..training.distill import DistillData


def load_tokenizer_or_processor(source: str, multimodal: bool, trust_remote_code: bool = False):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        if multimodal:
            return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as exc:
        hint = (
            " This processor ships custom code: pass --trust-remote-code."
            if multimodal and not trust_remote_code
            else ""
        )
        raise ModelLoadError(f"could not load the tokenizer/processor of '{source}': {exc}.{hint}") from exc


def calibration_batches(loaded: LoadedModel, recipe: Recipe, trust_remote_code: bool = False) -> list[CalibrationBatch]:
    cal = recipe.calibration
    processor = load_tokenizer_or_processor(loaded.source, loaded.adapter.is_multimodal, trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = text_calibration_batches(cal.dataset, tokenizer, cal.num_samples, cal.seq_len, cal.batch_size, cal.seed)
    if loaded.adapter.is_multimodal:
        if not cal.vl_dataset:
            raise CalibrationDataError(
                f"'{loaded.source}' is a vision-language model: set calibration.vl_dataset to an image+text jsonl "
                "so that image tokens are calibrated too."
            )
        batches += vl_calibration_batches(
            cal.vl_dataset, processor, loaded.model.config.image_token_id, cal.vl_num_samples, cal.seed
        )
    return batches


def training_batches(
    loaded: LoadedModel, r: DistillData, cal: CalibrationConfig, trust_remote_code: bool = False
) -> list[CalibrationBatch]:
    """Training data of a distillation stage: text windows (+ image+text items for VL models), shuffled together."""
    processor = load_tokenizer_or_processor(loaded.source, loaded.adapter.is_multimodal, trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = text_calibration_batches(
        r.dataset or cal.dataset, tokenizer, r.num_samples, r.seq_len, r.batch_size, r.seed
    )
    if loaded.adapter.is_multimodal and cal.vl_dataset and r.vl_num_samples:
        batches += vl_calibration_batches(
            cal.vl_dataset, processor, loaded.model.config.image_token_id, r.vl_num_samples, r.seed
        )
    random.Random(r.seed).shuffle(batches)
    return batches
