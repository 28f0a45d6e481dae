import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads it when first imported (transformers' MXFP4 code imports it too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TINY_TEXT = SHARED / "models" / "moe-tiny-text"
TINY_VL = SHARED / "models" / "moe-tiny-vl"
CALIB = SHARED / "data" / "calib" / "calib_mix.jsonl"
WIKI = SHARED / "data" / "wikitext-2" / "test.txt"
SHAPES = SHARED / "data" / "shapes-vl"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: these tests need the reference assets in ../shared beside the repo")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_text_path() -> Path:
    return require_shared(TINY_TEXT)


@pytest.fixture(scope="session")
def compressed_tiny_text(tmp_path_factory, tiny_text_path):
    """moe-tiny-text, GPTQ w4 g128 on a small calibration set, saved to disk; compressed in memory, so that
    `result.model` is the pipeline's own model (tests compare it with what loads from disk)."""
    from moecompress import compress
    from moecompress.recipe import Recipe

    recipe = Recipe.from_dict(
        {
            "name": "test-w4",
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 16, "seq_len": 256},
        }
    )
    out = tmp_path_factory.mktemp("ckpt") / "tiny-w4"
    result = compress(str(tiny_text_path), recipe, output=out, progress=False, stream=False)
    return result, out
