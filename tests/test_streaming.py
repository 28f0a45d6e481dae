"""The streamed engine: one decoder layer in memory, each finished layer stored at once, resumable after a kill,
and bit-identical to the in-memory pipeline."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moecompress
from moecompress.cli import main
from moecompress.errors import OutputError
from moecompress.recipe import Recipe
from moecompress.storage.tensorfiles import TensorFileError, read_header, write_safetensors, write_sharded

from .conftest import CALIB, SHAPES, TINY_VL, require_shared

SMALL = {"calibration": {"dataset": str(CALIB), "num_samples": 8, "seq_len": 128}}
RECIPES = {
    "gptq-w4": SMALL,
    "lp-2.5": {
        **SMALL,
        "allocation": {"method": "lp", "avg_bits": 2.5, "candidates": [2, 3, 4], "profile_tokens": 256},
    },
    "rtn-ternary": {**SMALL, "quantization": {"method": "rtn", "ternary": True, "group_size": -1}},
    "submoe-25": {**SMALL, "merge": {"method": "subspace", "ratio": 0.25, "sample_tokens": 256}},
    "prune-25": {**SMALL, "merge": {"method": "prune", "ratio": 0.25, "beam": 2, "sample_tokens": 256}},
    "factored": {**SMALL, "factor": {"enabled": True, "avg_bits": 2.09, "rank_steps": 8, "estimate": "rtn"}},
}


def tensor_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                out[key] = (
                    f"{t.dtype}{list(t.shape)}" + hashlib.sha256(t.view(-1).view(torch.uint8).numpy()).hexdigest()
                )
    return out


def recipe(name: str) -> Recipe:
    return Recipe.from_dict({"name": name, **json.loads(json.dumps(RECIPES[name]))})


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory, tiny_text_path):
    """moe-tiny-text compressed by the in-memory pipeline, per recipe (the reference)."""
    root, done = tmp_path_factory.mktemp("in-memory"), {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = root / name
            moecompress.compress(str(tiny_text_path), recipe(name), done[name], progress=False, stream=False)
        return done[name]

    return get


@pytest.mark.parametrize("name", list(RECIPES))
def test_streamed_run_writes_exactly_the_in_memory_tensors(name, in_memory, tiny_text_path, tmp_path):
    result = moecompress.compress(str(tiny_text_path), recipe(name), tmp_path / "s", progress=False)
    assert result.report.engine == "streamed"
    reference = in_memory(name)
    assert tensor_hashes(tmp_path / "s") == tensor_hashes(reference)
    config, ref_config = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "s", reference))
    assert config["quantization_config"] == ref_config["quantization_config"]
    assert not (tmp_path / "s.compress-state").exists()  # the state of a finished run is removed
    if name == "lp-2.5":
        assert json.loads((tmp_path / "s" / "plan.json").read_text()) == json.loads(
            (reference / "plan.json").read_text()
        )


def test_streamed_vl_run_matches_in_memory(tmp_path):
    vl = require_shared(TINY_VL)
    r = {
        "name": "vl",
        "calibration": {
            **SMALL["calibration"],
            "num_samples": 4,
            "vl_num_samples": 4,
            "vl_dataset": str(require_shared(SHAPES) / "calib.jsonl"),
        },
    }
    for out, stream in ((tmp_path / "s", True), (tmp_path / "m", False)):
        result = moecompress.compress(
            str(vl), Recipe.from_dict(r), out, progress=False, stream=stream, trust_remote_code=True
        )
        assert result.report.engine == ("streamed" if stream else "in-memory")
    assert tensor_hashes(tmp_path / "s") == tensor_hashes(tmp_path / "m")


KILLER = textwrap.dedent("""
    import os, signal, sys
    import moecompress
    from moecompress.storage import layer_store, tensorfiles
    from moecompress.recipe import Recipe

    source, output, recipe, where, layer = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    save_layer, write = layer_store.LayerStore.save_layer, tensorfiles.write_safetensors

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def saved(self, index, *args):
        if where == "inside" and index == layer:  # after the layer file, before its record
            layer_store.write_safetensors = lambda path, *a: kill() if "hidden" in path.name else write(path, *a)
        save_layer(self, index, *args)
        if where == "after" and index == layer:
            self.flush()  # stored (written in the background)
            kill()

    layer_store.LayerStore.save_layer = saved
    moecompress.compress(source, Recipe.from_yaml(recipe), output, progress=False)
""")


def killed_run(source: Path, output: Path, recipe_file: Path, where: str, layer: int) -> None:
    child = subprocess.run(
        [sys.executable, "-c", KILLER, str(source), str(output), str(recipe_file), where, str(layer)],
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


@pytest.mark.parametrize(
    "where, name", [("after", "gptq-w4"), ("inside", "gptq-w4"), ("after", "prune-25"), ("after", "factored")]
)
def test_sigkilled_run_resumes_after_its_last_stored_layer(
    where, name, in_memory, tiny_text_path, tmp_path, monkeypatch
):
    from moecompress.models.streaming import StreamedModel

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(recipe(name).to_yaml())
    out, state = tmp_path / "w4", tmp_path / "w4.compress-state"
    killed_run(tiny_text_path, out, recipe_file, where, layer=1)
    assert not out.exists()
    stored = sorted(p.name for p in state.glob("layer-*.json"))
    assert stored == (["layer-00000.json", "layer-00001.json"] if where == "after" else ["layer-00000.json"])

    loads = []
    load_layer = StreamedModel.load_layer
    monkeypatch.setattr(StreamedModel, "load_layer", lambda self, i, d: loads.append(i) or load_layer(self, i, d))
    moecompress.compress(str(tiny_text_path), Recipe.from_yaml(recipe_file), out, progress=False)
    merge_pass = [0, 1, 2, 3] if name == "prune-25" else []  # merging is redone, quantization resumes
    assert loads == merge_pass + ([2, 3] if where == "after" else [1, 2, 3])
    assert tensor_hashes(out) == tensor_hashes(in_memory(name))
    assert not state.exists()


def test_state_of_another_job_is_not_resumed(tiny_text_path, tmp_path, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(recipe("gptq-w4").to_yaml())
    killed_run(tiny_text_path, tmp_path / "w4", recipe_file, "after", layer=0)
    before = sorted(p.name for p in (tmp_path / "w4.compress-state").iterdir())
    other = tmp_path / "other.yaml"
    other.write_text(recipe("rtn-ternary").to_yaml())
    rc = main(["compress", str(tiny_text_path), "--recipe", str(other), "-o", str(tmp_path / "w4")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "w4.compress-state holds the state of another compress job" in err
    assert sorted(p.name for p in (tmp_path / "w4.compress-state").iterdir()) == before
    with pytest.raises(OutputError, match="another compress job"):
        moecompress.compress(str(tiny_text_path), recipe("rtn-ternary"), tmp_path / "w4", progress=False)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": (lambda s: _flip_last_byte(s / "layer-00000.safetensors"), "layer-00000.safetensors"),
    "truncated": (lambda s: os.truncate(s / "layer-00001.safetensors", 1000), "layer-00001.safetensors"),
    "swapped": (
        lambda s: shutil.copyfile(s / "layer-00001.safetensors", s / "layer-00000.safetensors"),
        "layer-00000.safetensors",
    ),
    "record lost": (lambda s: (s / "layer-00000.json").unlink(), "layer 0 is missing"),
    "record of another job": (
        lambda s: (s / "layer-00000.json").write_text(
            json.dumps({**json.loads((s / "layer-00000.json").read_text()), "job": "another"})
        ),
        "stored by another job",
    ),
    "record without hashes": (
        lambda s: (s / "layer-00000.json").write_text(json.dumps({"reports": []})),
        "record of layer 0",
    ),
}


@pytest.fixture(scope="module")
def killed_state(tmp_path_factory, tiny_text_path) -> tuple[Path, Path]:
    """(recipe file, the state a run killed after layer 1 left), made once: each test damages a copy."""
    root = tmp_path_factory.mktemp("killed")
    recipe_file = root / "r.yaml"
    recipe_file.write_text(recipe("gptq-w4").to_yaml())
    killed_run(tiny_text_path, root / "w4", recipe_file, "after", layer=1)
    return recipe_file, root / "w4.compress-state"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_resume_state_is_dropped_and_the_job_starts_over(
    damage, killed_state, in_memory, tiny_text_path, tmp_path, monkeypatch, caplog
):
    """A stored layer that is not what the run wrote is never resumed: the rerun says why and recomputes every layer."""
    from moecompress.models.streaming import StreamedModel

    recipe_file, killed = killed_state
    out, state = tmp_path / "w4", tmp_path / "w4.compress-state"
    shutil.copytree(killed, state)
    harm, named = DAMAGE[damage]
    harm(state)
    loads = []
    load_layer = StreamedModel.load_layer
    monkeypatch.setattr(StreamedModel, "load_layer", lambda self, i, d: loads.append(i) or load_layer(self, i, d))
    moecompress.compress(str(tiny_text_path), Recipe.from_yaml(recipe_file), out, progress=False)
    assert loads == [0, 1, 2, 3]
    assert any(named in r.getMessage() and "starts over" in r.getMessage() for r in caplog.records), caplog.text
    assert tensor_hashes(out) == tensor_hashes(in_memory("gptq-w4"))
    assert not state.exists()


def test_a_changed_plan_in_the_resume_state_is_made_again(
    killed_state, in_memory, tiny_text_path, tmp_path, monkeypatch, caplog
):
    recipe_file, killed = killed_state
    out, state = tmp_path / "w4", tmp_path / "w4.compress-state"
    shutil.copytree(killed, state)
    plan = json.loads((state / "plan.json").read_text())
    plan["method"] = "edited"
    (state / "plan.json").write_text(json.dumps(plan))
    moecompress.compress(str(tiny_text_path), Recipe.from_yaml(recipe_file), out, progress=False)
    assert any("plan.json does not match its sha256" in r.getMessage() for r in caplog.records), caplog.text
    assert tensor_hashes(out) == tensor_hashes(in_memory("gptq-w4"))


def test_assembly_needs_every_layer(tmp_path):
    from moecompress.storage.layer_store import LayerStore

    store = LayerStore(tmp_path / "s", "job")
    for index in (0, 1):
        store.save_layer(index, {f"l{index}": torch.randn(4)}, {}, [torch.randn(2)])
    assert [t.name for t in store.layer_tensors(2)] == ["l0", "l1"]
    store.save_layer(3, {"l3": torch.randn(4)}, {}, [torch.randn(2)])
    with pytest.raises(OutputError, match="lacks layer 2 of the 4"):
        store.layer_tensors(4)


def test_calibration_data_edited_in_place_is_another_job(tiny_text_path, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    shutil.copyfile(require_shared(CALIB), data)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        Recipe.from_dict(
            {**RECIPES["gptq-w4"], "calibration": {**SMALL["calibration"], "dataset": str(data)}}
        ).to_yaml()
    )
    killed_run(tiny_text_path, tmp_path / "w4", recipe_file, "after", layer=0)
    data.write_text("\n".join(reversed(data.read_text().splitlines())) + "\n")  # same path and recipe, other data
    rc = main(["compress", str(tiny_text_path), "--recipe", str(recipe_file), "-o", str(tmp_path / "w4")])
    assert rc == 2 and "holds the state of another compress job" in capsys.readouterr().err


@pytest.fixture
def sharded_source(tiny_text_path, tmp_path) -> Path:
    """moe-tiny-text re-saved as several shards with an index (as large models are published)."""
    dest = tmp_path / "sharded"
    dest.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_text_path / name, dest / name)
    names = write_sharded(dest, load_file(tiny_text_path / "model.safetensors").items(), max_shard_bytes=3 << 20)
    assert len(names) > 2
    return dest


def test_sharded_source_and_output_load_everywhere(sharded_source, tmp_path, in_memory):
    from transformers import AutoModelForCausalLM

    quick = tmp_path / "r.yaml"
    quick.write_text(recipe("gptq-w4").to_yaml())
    out = tmp_path / "w4"
    assert (
        main(["compress", str(sharded_source), "--recipe", str(quick), "-o", str(out), "--max-shard-size", "2MB"]) == 0
    )
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert tensor_hashes(out) == tensor_hashes(in_memory("gptq-w4"))
    ids = torch.randint(0, 8000, (1, 32))
    with torch.no_grad():
        expected = moecompress.load(in_memory("gptq-w4"))(input_ids=ids).logits
        assert torch.equal(moecompress.load(out)(input_ids=ids).logits, expected)
        assert torch.equal(
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits, expected
        )


def _index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _drop_shard(folder: Path) -> None:
    (folder / sorted(set(_index(folder)["weight_map"].values()))[1]).unlink()


def _truncate_shard(folder: Path) -> None:
    shard = folder / sorted(set(_index(folder)["weight_map"].values()))[2]
    shard.write_bytes(shard.read_bytes()[:-1000])


def _misplace_key(folder: Path) -> None:
    index = _index(folder)
    key = next(k for k in index["weight_map"] if ".layers.2." in k)
    index["weight_map"][key] = sorted(set(index["weight_map"].values()))[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_drop_shard, "is missing"),
        (_truncate_shard, "is truncated"),
        (_misplace_key, "which does not hold it"),
    ],
)
def test_damaged_sources_are_refused_before_any_work(damage, message, sharded_source, tmp_path, capsys):
    damage(sharded_source)
    quick = tmp_path / "r.yaml"
    quick.write_text(recipe("gptq-w4").to_yaml())
    for command in (["compress", "--recipe", str(quick)], ["analyze"], ["plan", "--recipe", str(quick)]):
        rc = main([command[0], str(sharded_source), *command[1:], "-o", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and message in err[-1] and "Traceback" not in "\n".join(err), err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "sharded"]


def test_a_tensor_stored_in_two_shards_is_named(sharded_source, tmp_path, capsys):
    index = json.loads((sharded_source / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    stray = next(k for k, f in index["weight_map"].items() if f == first)
    moved = load_file(sharded_source / second)
    moved[stray] = load_file(sharded_source / first)[stray]
    save_file(moved, sharded_source / second, metadata={"format": "pt"})
    rc = main(["compress", str(sharded_source), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and f"'{stray}' is stored twice, in {first} and {second}" in err


def test_one_tensor_above_the_file_size_limit_is_named(tiny_text_path, tmp_path):
    """--max-shard-size cannot help a tensor that alone exceeds `ulimit -f`: the error names it."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(recipe("gptq-w4").to_yaml())
    script = textwrap.dedent("""
        import resource, signal, sys
        from moecompress.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, resource.RLIM_INFINITY))  # layers fit, embeddings not
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "w4"
    argv = ["compress", str(tiny_text_path), "--recipe", str(recipe_file), "-o", str(out), "--max-shard-size", "1MB"]
    child = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)
    last = child.stderr.strip().splitlines()[-1]
    assert child.returncode == 2 and "tensor model.embed_tokens.weight alone is" in last and "2500000" in last, last
    assert not out.exists()


def test_a_full_disk_keeps_the_finished_layers_for_a_resume(tiny_text_path, tmp_path, in_memory):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(recipe("gptq-w4").to_yaml())
    script = textwrap.dedent("""
        import resource, signal, sys
        from moecompress.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) like one on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, resource.RLIM_INFINITY))  # every tensor fits
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "w4"
    child = subprocess.run(
        [sys.executable, "-c", script, "compress", str(tiny_text_path), "--recipe", str(recipe_file), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    last = child.stderr.strip().splitlines()[-1]
    assert child.returncode == 2 and "file-size limit" in last and "w4.compress-state" in last, child.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".w4.tmp-*"))
    assert len(list((tmp_path / "w4.compress-state").glob("layer-*.json"))) == 4  # all layers were done
    assert main(["compress", str(tiny_text_path), "--recipe", str(recipe_file), "-o", str(out)]) == 0
    assert tensor_hashes(out) == tensor_hashes(in_memory("gptq-w4"))


def test_tensor_files_round_trip_and_truncation_is_found(tmp_path):
    tensors = {
        f"t{i}": (torch.randn(3, 5 + i) * 7).to(dtype)
        for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.uint8, torch.int8])
    }
    tensors["scalar"] = torch.tensor(2.5)
    write_safetensors(tmp_path / "a.safetensors", list(tensors.values()), list(tensors))
    loaded = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    stored = read_header(tmp_path / "a.safetensors")  # copied by byte range into a second file
    write_safetensors(tmp_path / "b.safetensors", [stored[k] for k in reversed(tensors)], list(reversed(tensors)))
    assert all(torch.equal(load_file(tmp_path / "b.safetensors")[k], v) for k, v in tensors.items())
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data[:-3])
    with pytest.raises(TensorFileError, match="truncated"):
        read_header(tmp_path / "a.safetensors")


def test_streamed_compress_never_holds_the_whole_model(tiny_text_path, tmp_path, monkeypatch):
    """At most one decoder layer holds real weights at any time during the layer walk."""
    from moecompress.models.streaming import StreamedModel

    live = []
    load_layer = StreamedModel.load_layer

    def counting(self, index, device):
        layer = load_layer(self, index, device)
        real = [i for i, lay in enumerate(self.layers) if not next(lay.parameters()).is_meta]
        live.append(real)
        return layer

    monkeypatch.setattr(StreamedModel, "load_layer", counting)
    moecompress.compress(str(tiny_text_path), recipe("gptq-w4"), tmp_path / "o", progress=False)
    assert live == [[0], [1], [2], [3]]


def test_bfloat16_activations_are_held_in_bfloat16_and_change_little(in_memory, tiny_text_path, tmp_path, monkeypatch):
    from moecompress.storage.layer_store import LayerStore

    held = []
    save_layer = LayerStore.save_layer
    monkeypatch.setattr(
        LayerStore,
        "save_layer",
        lambda self, i, t, r, hidden: held.append({h.dtype for h in hidden}) or save_layer(self, i, t, r, hidden),
    )
    r = recipe("gptq-w4")
    r.calibration.activation_dtype = "bfloat16"
    moecompress.compress(str(tiny_text_path), r, tmp_path / "bf16", progress=False)
    assert held == [{torch.bfloat16}] * 4
    reference = in_memory("gptq-w4")
    assert tensor_hashes(tmp_path / "bf16") != tensor_hashes(reference)  # the option is in effect
    ids = torch.randint(0, 8000, (2, 64))
    with torch.no_grad():
        a = moecompress.load(tmp_path / "bf16")(input_ids=ids).logits.double()
        b = moecompress.load(reference)(input_ids=ids).logits.double()
    assert float((a - b).norm() / b.norm()) < 0.05


@pytest.mark.parametrize("name, stream", [("gptq-w4", True), ("lp-2.5", False), ("prune-25", True)])
def test_offloaded_activations_live_on_disk_and_change_nothing(
    name, stream, in_memory, tiny_text_path, tmp_path, monkeypatch
):
    """`calibration.offload_activations`: between layers every batch's activations are a file (in the state folder
    when streamed, else in $TMPDIR), the tensors written are the in-memory run's, and no file is left behind."""
    import tempfile

    from moecompress.calibration.engine import LayerInputs
    from moecompress.storage.tensorfiles import DiskTensors

    kept = []
    keep = LayerInputs.keep

    def watching(self, hidden):
        keep(self, hidden)
        kept.append((type(self.hidden), {t.file.parent.parent for t in getattr(self.hidden, "entries", [])}))
        if self.holding.spill_to is not None:  # (the in-memory reference run keeps its activations in memory)
            assert len(list(self.holding.spill_to.iterdir())) <= 2  # this layer's outputs and its inputs, no more

    monkeypatch.setattr(LayerInputs, "keep", watching)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    r = recipe(name)
    r.calibration.offload_activations = True
    moecompress.compress(str(tiny_text_path), r, tmp_path / "o", progress=False, stream=stream)
    assert kept and all(kind is DiskTensors for kind, _ in kept)
    homes = {folder.parent for _, folders in kept for folder in folders}
    assert homes == ({tmp_path / "o.compress-state" / "scratch"} if stream else {tmp_path / "tmp"})
    assert not list((tmp_path / "tmp").glob("moecompress-*")) and not (tmp_path / "o.compress-state").exists()
    assert tensor_hashes(tmp_path / "o") == tensor_hashes(in_memory(name))


def test_a_layer_with_a_block_per_modality_resumes_with_both(tmp_path, monkeypatch):
    """ERNIE-4.5-VL: the store keeps each finished layer's text and vision experts (formats and reports per block);
    a run stopped in layer 2 resumes after layer 1 and writes the tensors of an uninterrupted run."""
    from moecompress.models.streaming import StreamedModel

    from .calibration.test_engine import image_batch
    from .models.tiny_models import tiny_model

    model = tiny_model("ernie4_5_vl_moe")
    model.save_pretrained(tmp_path / "src")
    batch = image_batch(model)
    monkeypatch.setattr("moecompress.pipeline.calibration_batches", lambda *args, **kwargs: [batch])
    r = Recipe.from_dict({"quantization": {"method": "gptq", "bits": 4, "group_size": 16}})
    moecompress.compress(str(tmp_path / "src"), r, tmp_path / "whole", progress=False)

    load_layer = StreamedModel.load_layer

    def stop_at_layer_2(self, index, device):
        if index == 2:
            raise KeyboardInterrupt
        return load_layer(self, index, device)

    monkeypatch.setattr(StreamedModel, "load_layer", stop_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        moecompress.compress(str(tmp_path / "src"), r, tmp_path / "w4", progress=False)
    state = tmp_path / "w4.compress-state"
    assert sorted(p.name for p in state.glob("layer-*.json")) == ["layer-00000.json", "layer-00001.json"]
    assert set(json.loads((state / "layer-00001.json").read_text())["formats"]) == {"text", "image"}
    monkeypatch.setattr(StreamedModel, "load_layer", load_layer)
    moecompress.compress(str(tmp_path / "src"), r, tmp_path / "w4", progress=False)
    assert tensor_hashes(tmp_path / "w4") == tensor_hashes(tmp_path / "whole")
    record = json.loads((tmp_path / "w4" / "run.json").read_text())  # the restored blocks' reports, then the others
    assert record["importance"]["layers"] == ["1.text", "1.image", "2.text", "2.image"]
