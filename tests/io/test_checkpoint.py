import json
import shutil

import pytest
import torch

import moecompress
from moecompress.errors import CheckpointError
from moecompress.io import checkpoint
from moecompress.runtime import PackedExperts

from ..conftest import WIKI


def logits(model, seed=1):
    ids = torch.randint(0, 8000, (2, 96), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_load_of_save_gives_identical_logits(compressed_tiny_text):
    result, out = compressed_tiny_text
    loaded = moecompress.load(out)
    assert isinstance(loaded.model.layers[0].mlp.experts, PackedExperts)
    assert torch.equal(logits(result.model), logits(loaded))


def test_automodel_from_pretrained_loads_the_packed_checkpoint(compressed_tiny_text):
    from transformers import AutoModelForCausalLM

    result, out = compressed_tiny_text
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(logits(result.model), logits(model))


def test_w4_keeps_tiny_text_perplexity_within_5_percent(compressed_tiny_text, tiny_text_path):
    from transformers import AutoTokenizer

    from moecompress.evaluation.perplexity import perplexity
    from moecompress.models import load_model

    result, out = compressed_tiny_text
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = perplexity(load_model(str(tiny_text_path)).model, tokenizer, str(WIKI), max_windows=24, progress=False)
    quantized = perplexity(
        moecompress.load(out, cache_dequantized=True), tokenizer, str(WIKI), max_windows=24, progress=False
    )
    assert quantized.ppl < 1.05 * reference.ppl


def test_manifest_describes_every_packed_tensor(compressed_tiny_text):
    _, out = compressed_tiny_text
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    entry = manifest["tensors"]["model.layers.0.mlp.experts.0.down_proj"]
    assert entry["bits"] == 4 and entry["group_size"] == 128 and entry["shape"] == [256, 256]
    assert len(manifest["tensors"]) == 4 * 16 * 3
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer.json").is_file()


def test_packed_experts_take_about_bits_over_8_bytes_per_parameter(compressed_tiny_text):
    result, _ = compressed_tiny_text
    r = result.report
    # 4 bits of codes + fp16 scale and 8-bit zero per 128 weights = 4.1875 bits
    assert r.bits_per_expert_param == pytest.approx(4 + 24 / 128)


@pytest.fixture
def copy_of(compressed_tiny_text, tmp_path):
    _, out = compressed_tiny_text
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    return target


def test_truncated_weights_are_reported(copy_of):
    weights = copy_of / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        moecompress.load(copy_of)


def test_corrupted_weights_are_reported(copy_of):
    weights = copy_of / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        moecompress.load(copy_of)


def test_missing_manifest_and_missing_folder_are_reported(copy_of, tmp_path):
    (copy_of / checkpoint.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not a moecompress checkpoint"):
        moecompress.load(copy_of)
    with pytest.raises(CheckpointError, match="does not exist"):
        moecompress.load(tmp_path / "nowhere")


def test_a_failed_save_leaves_no_output(compressed_tiny_text, tmp_path, monkeypatch):
    result, _ = compressed_tiny_text

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("moecompress.storage.tensorfiles._tensor_bytes", crash)
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save_checkpoint(result.model, target, "name: x\n", "src")
    assert list(tmp_path.iterdir()) == []


def test_weight_files_get_the_usual_permissions(tmp_path):
    import os

    from moecompress.storage.tensorfiles import write_sharded

    names = write_sharded(tmp_path, {"a": torch.randn(3), "b": torch.randn(4)}.items(), max_shard_bytes=12)
    umask = os.umask(0)
    os.umask(umask)
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert all((tmp_path / n).stat().st_mode & 0o777 == 0o666 & ~umask for n in names)
    assert (tmp_path / "model.safetensors.index.json").is_file()


def test_aux_files_follow_links_only_inside_the_folder_or_a_hub_cache_blob_store(tmp_path):
    import os

    (tmp_path / "blobs").mkdir()
    snapshot = tmp_path / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "blobs" / "x").write_text("tokenizer")
    os.symlink("../../blobs/x", snapshot / "tokenizer.json")  # how the Hugging Face cache stores files
    (tmp_path / "secret").write_text("password")
    os.symlink(tmp_path / "secret", snapshot / "tokenizer_config.json")
    (snapshot / ".tokenizer.py").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    checkpoint.copy_aux_files(str(snapshot), out)
    assert [p.name for p in out.iterdir()] == ["tokenizer.json"] and (out / "tokenizer.json").read_text() == "tokenizer"
