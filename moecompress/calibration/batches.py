"""Calibration and training batches for a loaded model: its tokenizer or processor, text windows and, for
vision-language models, image+text items."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CalibrationDataError, ModelLoadError
from .config import CalibrationConfig
from .data import CalibrationBatch, text_calibration_batches, vl_calibration_batches
from .engine import Activations

if TYPE_CHECKING:
    from ..models import LoadedModel

log = logging.getLogger(__name__)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "*.tiktoken",
)


def load_tokenizer_or_processor(source: str, multimodal: bool, trust_remote_code: bool = False, config=None):
    """The tokenizer (or, for a VL model, the processor) of `source`; with the model's `config`, one whose vocabulary
    is far smaller than the model's (not this model's tokenizer) is refused."""
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(source).expanduser()
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ModelLoadError(
            f"'{source}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy them from the original "
            "model into the folder."
        )
    try:
        if multimodal:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        else:
            processor = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as exc:
        hint = (
            " This processor ships custom code: pass --trust-remote-code."
            if multimodal and not trust_remote_code
            else ""
        )
        raise ModelLoadError(f"could not load the tokenizer/processor of '{source}': {exc}.{hint}") from exc
    vocab = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
    size = len(getattr(processor, "tokenizer", processor))
    if vocab and size * 4 < vocab:
        raise ModelLoadError(
            f"the tokenizer of '{source}' has {size} tokens for a model of {vocab}: it is not this model's tokenizer; "
            "copy the original tokenizer files into the folder."
        )
    return processor


@contextlib.contextmanager
def activation_holding(cal: CalibrationConfig, folder: Path | None = None):
    """How `cal` holds the calibration activations between layers: in `cal.activation_dtype`, and with
    `cal.offload_activations` on disk, in `folder` (the run's state folder) or else a temporary folder (in $TMPDIR)
    removed afterwards."""
    dtype = getattr(torch, cal.activation_dtype)
    if not cal.offload_activations:
        yield Activations(dtype)
    elif folder is not None:
        yield Activations(dtype, folder)
    else:
        with tempfile.TemporaryDirectory(prefix="moecompress-activations-") as tmp:
            yield Activations(dtype, Path(tmp))


def calibration_batches(
    loaded: LoadedModel, cal: CalibrationConfig, trust_remote_code: bool = False
) -> list[CalibrationBatch]:
    """The calibration batches `cal` names: text windows, plus image+text items for vision-language models."""
    processor = load_tokenizer_or_processor(
        loaded.source, loaded.adapter.is_multimodal, trust_remote_code, loaded.model.config
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = text_calibration_batches(cal.dataset, tokenizer, cal.num_samples, cal.seq_len, cal.batch_size, cal.seed)
    if loaded.adapter.is_multimodal:
        if not cal.vl_dataset:
            raise CalibrationDataError(
                f"'{loaded.source}' is a vision-language model: set calibration.vl_dataset to an image+text jsonl "
                "so that image tokens are calibrated too."
            )
        batches += vl_calibration_batches(cal.vl_dataset, processor, image_mask(loaded), cal.vl_num_samples, cal.seed)
    elif cal.vl_dataset:
        log.warning("calibration.vl_dataset is not used: '%s' is a text-only model.", loaded.source)
    return batches


def image_mask(loaded: LoadedModel):
    return lambda input_ids: loaded.adapter.image_token_mask(loaded.model, input_ids)
