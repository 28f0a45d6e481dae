"""The `calibration:` section of a recipe: which data the layer-wise passes observe, and how their activations are
held between layers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CalibrationConfig:
    dataset: str = "../shared/data/calib/calib_mix.jsonl"
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    vl_dataset: str | None = None
    vl_num_samples: int = 128
    seed: int = 0
    activation_dtype: str = "float32"  # calibration activations held between layers; bfloat16 halves them
    offload_activations: bool = False  # hold them on disk (state folder, else $TMPDIR), one batch in memory at a time
    # the peak memory of a streamed run ("6GB", or bytes); default: most of the memory free at the start. A layer
    # whose experts do not fit is worked on a chunk of experts at a time (`calibration.budget`)
    max_memory: str | int | None = None
    experts_per_chunk: int | None = None  # a chunk size of your own instead of the one the budget gives
