"""Fault injection: bad inputs, tampered checkpoints, concurrent and interrupted runs.

Every refused case must end with one `error:` line, exit status 2 (130 for an interrupt), nothing created at
the output path and nothing else touched (the directory tree is snapshotted before and after)."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moecompress
from moecompress.cli import main
from moecompress.errors import CheckpointError, NonFiniteError
from moecompress.storage.outputs import claim_output

from .conftest import CALIB, TINY_VL, WIKI, require_shared

QUICK = {
    "name": "quick",
    "calibration": {"dataset": str(CALIB), "num_samples": 2, "seq_len": 64},
    "quantization": {"method": "rtn"},
}


def tree(root: Path) -> dict:
    """Every file and folder below `root` (dotfiles too) with size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


def refused(capsys, argv, root: Path, output: Path | None = None, status: int = 2, kept: str | None = None) -> str:
    """Run the CLI, expect a one-line error with `status`, nothing new at `output`, `root` unchanged but for the
    folder `kept` (a streamed run's finished layers, kept for a resume)."""
    before, existed = tree(root), output is not None and output.exists()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == status, err
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    if output is not None and not existed:
        assert not output.exists()
    after = tree(root)
    if kept is not None:
        assert after[kept][0], f"{kept} was not kept"
        after = {k: v for k, v in after.items() if k != kept and not k.startswith(kept + "/")}
    assert after == before
    return errors[0]


def write_recipe(folder: Path, data: dict | str, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_text_path) -> Path:
    """A writable copy of moe-tiny-text (the user's own model folder)."""
    dest = tmp_path_factory.mktemp("user") / "models" / "tiny"
    shutil.copytree(tiny_text_path, dest)
    return dest


@pytest.fixture
def ckpt(compressed_tiny_text, tmp_path) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(compressed_tiny_text[1], dest)
    return dest


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: the error must come before any work."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    for module in ("moecompress.pipeline", "moecompress.models"):
        monkeypatch.setattr(f"{module}.load_model", forbidden)


# --- output safety -------------------------------------------------------------------------------------------


def test_output_holding_user_files_is_refused(capsys, tmp_path, model_dir, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    msg = refused(capsys, ["compress", model_dir, "-o", out, "--overwrite"], tmp_path)
    assert "did not write" in msg and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "where,why", [("self", "is the input"), ("child", "inside the input"), ("parent", "contains the input")]
)
def test_output_on_the_source_or_above_it_is_refused(capsys, model_dir, no_model_load, where, why):
    target = {"self": model_dir, "child": model_dir / "w4", "parent": model_dir.parent}[where]
    assert why in refused(capsys, ["compress", model_dir, "-o", target, "--overwrite"], model_dir.parent.parent)


@pytest.mark.parametrize("target", [".", ".."])
def test_output_on_the_working_directory_or_above_is_refused(
    capsys, tmp_path, model_dir, no_model_load, monkeypatch, target
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "draft.txt").write_text("x")
    monkeypatch.chdir(work)
    assert "working directory" in refused(capsys, ["compress", model_dir, "-o", target, "--overwrite"], tmp_path)


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{ckpt}", "--format", "compressed-tensors"],
        ["export", "{ckpt}", "--hub", "me/x", "--base-model", "org/x", "--dry-run"],
        ["plan", "{model}", "--avg-bits", "3"],
        ["analyze", "{model}"],
        ["report", "{ckpt}"],
        ["upcycle", "{model}"],
    ],
)
def test_every_writing_command_refuses_a_user_folder(capsys, tmp_path, ckpt, model_dir, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.bin").write_bytes(b"\x00" * 10)
    argv = [a.format(ckpt=ckpt, model=model_dir) for a in command]
    assert "did not write" in refused(capsys, [*argv, "-o", out, "--overwrite"], tmp_path)


def test_earlier_output_needs_overwrite_and_is_then_replaced(capsys, tmp_path, model_dir):
    recipe, out = write_recipe(tmp_path, QUICK), tmp_path / "w4"
    assert main(["compress", str(model_dir), "--recipe", str(recipe), "-o", str(out)]) == 0
    first = (out / "moecompress.json").read_bytes()
    assert "--overwrite" in refused(capsys, ["compress", model_dir, "--recipe", recipe, "-o", out], tmp_path)
    assert main(["compress", str(model_dir), "--recipe", str(recipe), "-o", str(out), "--overwrite"]) == 0
    assert (out / "moecompress.json").is_file() and (out / ".moecompress-output").is_file()
    assert (
        json.loads((out / "moecompress.json").read_bytes())["files"] == json.loads(first)["files"]
    )  # same job, same weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "w4"]  # no lock, temporary or backup left


def test_the_output_lock_is_held_during_a_claim_and_removed_after(tmp_path, model_dir):
    import fcntl

    out = tmp_path / "w4"
    with claim_output(out, [model_dir]):
        fd = os.open(tmp_path / ".w4.lock", os.O_RDWR)  # what a second process would try
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert list(tmp_path.iterdir()) == []


def test_a_second_cli_run_on_a_locked_output_is_refused(capsys, tmp_path, model_dir, no_model_load):
    import fcntl

    out = tmp_path / "w4"
    lock = tmp_path / ".w4.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's run holding the output
    try:
        assert "another moecompress run" in refused(capsys, ["compress", model_dir, "-o", out], tmp_path, out)
    finally:
        os.close(fd)


def test_stale_temporaries_are_cleaned_and_an_interrupted_replace_is_undone(tmp_path, model_dir):
    out = tmp_path / "w4"
    (tmp_path / ".w4.tmp-0123abcd").mkdir()
    (tmp_path / ".w4.tmp-0123abcd" / "model.safetensors").write_bytes(b"half")
    backup = tmp_path / ".w4.old-89abcdef"  # a killed --overwrite left the previous output here
    backup.mkdir()
    (backup / "moecompress.json").write_text("{}")
    with claim_output(out, [model_dir], overwrite=True):
        assert (out / "moecompress.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4"]


def test_interrupt_ends_with_one_line_and_keeps_the_previous_output(capsys, tmp_path, model_dir, monkeypatch):
    recipe, out = write_recipe(tmp_path, QUICK), tmp_path / "w4"
    assert main(["compress", str(model_dir), "--recipe", str(recipe), "-o", str(out)]) == 0
    capsys.readouterr()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moecompress.io.checkpoint.write_sharded", ctrl_c)  # in the middle of writing the new output
    msg = refused(  # in memory: a streamed run would keep its finished layers for a resume (tests/test_streaming.py)
        capsys,
        ["compress", model_dir, "--recipe", recipe, "-o", out, "--overwrite", "--no-stream"],
        tmp_path,
        out,
        status=130,
    )
    assert "interrupted" in msg


# --- integrity on every load path ------------------------------------------------------------------------------


def _rewrite_manifest(ckpt: Path, edit) -> None:
    manifest = json.loads((ckpt / "moecompress.json").read_text())
    edit(manifest)
    (ckpt / "moecompress.json").write_text(json.dumps(manifest))


def _rehash(ckpt: Path) -> None:
    """What a careless re-save does: the manifest's files table made to match whatever the files now are."""
    from moecompress.io.integrity import file_sha256

    def edit(m):
        for name in m["files"]:
            m["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": file_sha256(ckpt / name)}

    _rewrite_manifest(ckpt, edit)


def _edit_config(ckpt: Path, edit, rehash_config: bool) -> None:
    from moecompress.io.integrity import canonical_sha256

    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(config))
    if rehash_config:
        _rewrite_manifest(
            ckpt,
            lambda m: m["config"].update(quantization_config_sha256=canonical_sha256(config["quantization_config"])),
        )


def test_flipped_bytes_fail_transformers_from_pretrained_too(ckpt, capsys):
    from transformers import AutoModelForCausalLM

    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(ckpt)
    assert "sha256" in refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI, "--max-windows", "1"], ckpt.parent)


def test_hash_check_opt_out_still_checks_structure(ckpt, monkeypatch):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-100] ^= 0x01
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    moecompress.load(ckpt, verify=False)  # documented opt-out: sizes and structure only
    monkeypatch.setenv("MOECOMPRESS_VERIFY_HASHES", "0")
    (ckpt / "config.json").write_text(
        (ckpt / "config.json").read_text().replace('"group_size": 128', '"group_size": 64')
    )
    with pytest.raises(CheckpointError, match="quantization_config was changed"):
        moecompress.load(ckpt)


def test_empty_files_table_is_an_error(ckpt, capsys):
    _rewrite_manifest(ckpt, lambda m: m.update(files={}))
    assert "'files'" in refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI, "--max-windows", "1"], ckpt.parent)


@pytest.mark.parametrize("rehash_config", [False, True])
@pytest.mark.parametrize(
    "edit,why",
    [
        (lambda qc: qc["experts"].pop(next(iter(qc["experts"]))), "packed modules"),
        (lambda qc: qc["experts"][next(iter(qc["experts"]))].pop(), "packed modules"),
        (lambda qc: qc["formats"][0].update(group_size=129), "g129"),
    ],
)
def test_config_edits_are_caught_even_with_a_matching_hash(ckpt, capsys, edit, why, rehash_config):
    _edit_config(ckpt, edit, rehash_config)
    msg = refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI, "--max-windows", "1"], ckpt.parent)
    assert why in msg if rehash_config else "quantization_config was changed" in msg
    with pytest.raises(CheckpointError):
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(ckpt)


def test_config_without_its_quantization_section_is_refused(ckpt, capsys):
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]  # transformers alone would build fused experts and fill them at random
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "no moecompress quantization_config" in refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI], ckpt.parent)


@pytest.mark.parametrize(
    "tensor",
    [
        "model.layers.1.mlp.experts.3.up_proj.weight_scale",
        "model.layers.0.mlp.experts.0.down_proj.weight_packed",
        "model.layers.2.self_attn.q_proj.weight",
    ],
)
@pytest.mark.parametrize("manifest_too", [False, True])
def test_tensor_missing_from_the_weights_is_an_error(ckpt, tensor, manifest_too):
    state = load_file(ckpt / "model.safetensors")
    del state[tensor]
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    _rehash(ckpt)
    if manifest_too:  # the weights table edited to match: the model itself still needs the tensor
        _rewrite_manifest(ckpt, lambda m: m["weights"].pop(tensor))
    with pytest.raises(CheckpointError, match="missing"):
        moecompress.load(ckpt)


@pytest.mark.parametrize(
    "edit,why",
    [
        (lambda t: t.update(bits=3), "w3"),
        (lambda t: t.update(shape=[256, 512]), "wrong shape"),
    ],
)
def test_manifest_formats_and_shapes_are_checked(ckpt, edit, why):
    _rewrite_manifest(ckpt, lambda m: edit(m["tensors"]["model.layers.0.mlp.experts.5.gate_proj"]))
    with pytest.raises(CheckpointError, match=why):
        moecompress.load(ckpt)


@pytest.mark.parametrize(
    "text,why",
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "moecompress", "format_version": "2"}', "version '2'"),
        ('{"format": "moecompress", "format_version": 2}', "'files'"),
        ('{"format": "moecompress", "format_version": 2, "files": {"../x.safetensors": {}}, "tensors": {}}', "plain"),
        ("not json", "not valid JSON"),
    ],
)
def test_malformed_manifests_are_clear_errors(ckpt, capsys, text, why):
    (ckpt / "moecompress.json").write_text(text)
    assert why in refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI], ckpt.parent)


# --- finite numbers --------------------------------------------------------------------------------------------


@pytest.fixture
def nan_model(tmp_path, model_dir):
    """moe-tiny-text with one NaN in layer 1, expert 3, up projection."""
    dest = tmp_path / "nan-model"
    shutil.copytree(model_dir, dest)
    state = load_file(dest / "model.safetensors")
    state["model.layers.1.mlp.experts.3.up_proj.weight"][7, 11] = float("nan")
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("method", ["rtn", "gptq", "factor"])
def test_non_finite_source_weights_are_named(capsys, tmp_path, nan_model, method):
    factor = {"factor": {"enabled": True, "avg_bits": 2.09, "estimate": "rtn", "rank_steps": 4}}
    sections = factor if method == "factor" else {"quantization": {"method": method}}
    recipe = write_recipe(tmp_path, {**QUICK, **sections})
    msg = refused(
        capsys,
        ["compress", nan_model, "--recipe", recipe, "-o", tmp_path / "o"],
        tmp_path,
        tmp_path / "o",
        kept="o.compress-state",
    )  # layer 0 was done before layer 1 was read
    assert "layer 1 expert 3 up_proj" in msg and "NaN" in msg


def test_non_finite_perplexity_is_an_error_not_nan_json():
    from moecompress.evaluation.perplexity import perplexity

    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.full((*input_ids.shape, 50), float("nan"))})

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 50 for c in text]}

    with pytest.raises(NonFiniteError, match="non-finite"):
        perplexity(NaNModel(), Tok(), str(WIKI), seq_len=32, max_windows=2, progress=False)


# --- hub export --------------------------------------------------------------------------------------------------


def test_hub_export_copies_only_checkpoint_files_and_no_local_paths(ckpt, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (ckpt / ".env").write_text("HF_TOKEN=hf_secret")
    (ckpt / "tokenizer_extra.json").symlink_to(secret)  # matches the tokenizer* pattern, points outside
    (ckpt / "notes.md").write_text("private notes")
    assert (
        main(
            [
                "export",
                str(ckpt),
                "--hub",
                "me/tiny-w4",
                "--base-model",
                "org/tiny",
                "--dry-run",
                "-o",
                str(tmp_path / "hub"),
            ]
        )
        == 0
    )
    hub = tmp_path / "hub"
    published = sorted(p.name for p in hub.iterdir() if not p.name.startswith(".moecompress"))
    assert ".env" not in published and "tokenizer_extra.json" not in published and "notes.md" not in published
    assert "model.safetensors" in published and "run.json" in published
    for name in published:
        text = (hub / name).read_bytes().decode("utf-8", errors="ignore")
        assert str(tmp_path) not in text and str(Path.home()) + "/" not in text, name
        assert "hf_secret" not in text and "password" not in text
    record = json.loads((hub / "run.json").read_text())
    assert record["model"] == "me/tiny-w4" and record["base_model"] == "org/tiny"
    moecompress.load(hub)  # the published folder is still a valid checkpoint


# --- validation up front ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,why",
    [
        (["--seq-len", "0"], "--seq-len"),
        (["--seq-len", "1"], "--seq-len"),
        (["--seq-len", "-5"], "--seq-len"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-windows", "-1"], "--max-windows"),
        (["--max-windows", "0"], "--max-windows"),
    ],
)
def test_eval_numbers_are_checked(capsys, ckpt, args, why):
    assert why in refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI, *args], ckpt.parent)


@pytest.mark.parametrize(
    "recipe,why",
    [
        ({"calibration": {"batch_size": 0}}, "batch_size"),
        ({"device": "tpu"}, "use cpu, cuda"),
        ({"quantization": {"group_size": True}}, "expected int, got True"),
        ({"allocation": {"method": "lp", "modality_weights": {"text": "high"}}}, "modality_weights.text"),
        ({"allocation": {"method": "lp", "avg_bits": 1.0}}, "infeasible"),
        ("quantization:\n  bits: 4\n  bits: 3\n", "given twice"),
        ("quantization: [1, 2", "not valid YAML"),
    ],
)
def test_recipe_values_are_checked_before_loading(capsys, tmp_path, model_dir, no_model_load, recipe, why):
    path = write_recipe(tmp_path, recipe)
    assert why in refused(
        capsys, ["compress", model_dir, "--recipe", path, "-o", tmp_path / "o"], tmp_path, tmp_path / "o"
    )


@pytest.mark.parametrize(
    "args,why",
    [
        (["--num-samples", "0"], "--num-samples"),
        (["--avg-bits", "nan"], "--avg-bits"),
        (["--device", "cuda"], "CUDA"),
        (["--json", "/nonexistent-dir/r.json"], "--json"),
    ],
)
def test_compress_arguments_are_checked_before_loading(capsys, tmp_path, model_dir, no_model_load, args, why):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert why in refused(capsys, ["compress", model_dir, "-o", tmp_path / "o", *args], tmp_path, tmp_path / "o")


def test_plan_that_does_not_fit_the_model_is_refused(capsys, tmp_path, model_dir):
    from moecompress.allocation import CompressionPlan
    from moecompress.formats import IntFormat

    small = CompressionPlan.uniform([0, 1], 16, IntFormat(4, 128))
    small.save(tmp_path / "small.json")
    recipe = write_recipe(tmp_path, QUICK)
    assert "covers MoE layers [0, 1]" in refused(
        capsys,
        ["compress", model_dir, "--recipe", recipe, "--plan", tmp_path / "small.json", "-o", tmp_path / "o"],
        tmp_path,
        tmp_path / "o",
    )
    bad = CompressionPlan.uniform([0, 1, 2, 3], 16, IntFormat(4, 128))
    bad.choice[1, 2, 0] = -1
    bad.save(tmp_path / "negative.json")
    assert "malformed" in refused(
        capsys,
        ["compress", model_dir, "--recipe", recipe, "--plan", tmp_path / "negative.json", "-o", tmp_path / "o"],
        tmp_path,
        tmp_path / "o",
    )


@pytest.mark.parametrize(
    "content,why",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not UTF-8"),
        ("caf\xe9".encode("latin-1"), "not UTF-8"),
        (b'{"text": null}\n', "must be a string"),
        (b'{"txt": "a"}\n', "'text' field"),
    ],
)
def test_bad_calibration_and_evaluation_data(capsys, tmp_path, model_dir, ckpt, content, why):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    assert why in refused(
        capsys, ["compress", model_dir, "--calib", data, "-o", tmp_path / "o"], tmp_path, tmp_path / "o"
    )
    assert why in refused(capsys, ["eval", "ppl", ckpt, "--data", data], tmp_path)


def test_truncated_source_weights_are_a_clear_error(capsys, tmp_path, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert "could not load the weights" in refused(capsys, ["compress", broken, "-o", tmp_path / "o"], tmp_path)


def test_model_path_that_is_a_file_or_a_bare_name(capsys, tmp_path, model_dir):
    assert "is a file" in refused(capsys, ["compress", model_dir / "config.json", "-o", tmp_path / "o"], tmp_path)
    assert "does not exist" in refused(capsys, ["compress", "no-such-model", "-o", tmp_path / "o"], tmp_path)


def test_upcycle_top_k_above_experts(capsys, tmp_path, model_dir):
    assert "--top-k 8" in refused(
        capsys, ["upcycle", model_dir, "--experts", "4", "--top-k", "8", "-o", tmp_path / "o"], tmp_path, tmp_path / "o"
    )


def test_record_file_holding_a_list_is_refused_before_loading(capsys, tmp_path, model_dir, no_model_load):
    record = tmp_path / "runs.json"
    record.write_text("[1, 2]")
    msg = refused(capsys, ["eval", "ppl", model_dir, "--data", WIKI, "--record", record], tmp_path)
    assert "not a moecompress run record" in msg


def test_vl_model_without_trust_remote_code_shows_the_hint(capsys, tmp_path):
    vl = require_shared(TINY_VL)
    try:
        import torchvision  # noqa: F401

        pytest.skip("with torchvision the processor loads without remote code")
    except ImportError:
        pass
    assert "--trust-remote-code" in refused(capsys, ["eval", "vlqa", vl, "--data", WIKI], tmp_path)


def test_recipe_data_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    from moecompress.recipe import Recipe

    (tmp_path / "recipes").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calib.jsonl").write_text('{"text": "hello"}\n')
    path = write_recipe(
        tmp_path / "recipes", {"calibration": {"dataset": "../data/calib.jsonl", "vl_dataset": "org/hub-dataset"}}
    )
    monkeypatch.chdir(tmp_path / "data")
    recipe = Recipe.from_yaml(path)
    assert recipe.calibration.dataset == str(tmp_path / "data" / "calib.jsonl")
    assert recipe.calibration.vl_dataset == "org/hub-dataset"
    repo = Path(__file__).resolve().parent.parent
    shipped = Recipe.from_yaml(repo / "pipelines" / "gptq-w4g128.yaml")
    assert Path(shipped.calibration.dataset).is_file()


# --- second pass: plain loaders, malformed configs, damaged sources, concurrency --------------------------------


def test_a_checkpoint_stripped_of_its_quantization_config_is_refused_by_plain_transformers(ckpt):
    from transformers import AutoModelForCausalLM

    manifest = json.loads((ckpt / "moecompress.json").read_text())
    assert manifest["format_version"] == 4 and manifest["weights"][manifest["guard"]]["shape"] == [1]
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # instead of a model with random experts
        AutoModelForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "edit,why",
    [
        (lambda qc: qc["experts"][next(iter(qc["experts"]))][0].__setitem__(0, 99), "malformed"),
        (lambda qc: qc.update(formats=[]), "malformed"),
        (
            lambda qc: qc["experts"].update(
                {"model.layers.9.mlp.experts": qc["experts"].pop(next(iter(qc["experts"])))}
            ),
            "model.layers.9.mlp.experts",
        ),
    ],
    ids=["format-index", "no-formats", "module-path"],
)
def test_a_malformed_quantization_config_is_one_error_on_every_load_path(ckpt, capsys, edit, why):
    from transformers import AutoModelForCausalLM

    _edit_config(ckpt, edit, rehash_config=True)
    assert why in refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI, "--max-windows", "1"], ckpt.parent)
    for load in (moecompress.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError, match=re.escape(why)):
            load(ckpt)


def _untie(state: dict, config: dict) -> None:
    config["tie_word_embeddings"] = False  # and no lm_head.weight stored


def _int_weight(state: dict, config: dict) -> None:
    key = "model.layers.1.self_attn.q_proj.weight"
    state[key] = (state[key] * 100).to(torch.int32)


def _inf(key: str):
    def harm(state: dict, config: dict) -> None:
        if key == "lm_head.weight":
            config["tie_word_embeddings"] = False
            state[key] = state["model.embed_tokens.weight"].clone()
        state[key][5, 3] = float("inf")

    return harm


SOURCE_FAULTS = {
    "integer weight": (_int_weight, "as I32, an integer type"),
    "untied without lm_head": (_untie, "no weight for lm_head.weight"),
    "top_k above experts": (lambda s, c: c.update(num_experts_per_tok=c["num_experts"] + 1), "17 experts of 16"),
    "inf embedding": (_inf("model.embed_tokens.weight"), "model.embed_tokens.weight holds NaN/Inf"),
    "inf lm_head": (_inf("lm_head.weight"), "lm_head.weight holds NaN/Inf"),
}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "in-memory"])
@pytest.mark.parametrize("fault", list(SOURCE_FAULTS))
def test_damaged_sources_are_one_error_line(capsys, tmp_path, model_dir, fault, stream):
    harm, why = SOURCE_FAULTS[fault]
    source = tmp_path / "src"
    shutil.copytree(model_dir, source)
    state, config = load_file(source / "model.safetensors"), json.loads((source / "config.json").read_text())
    harm(state, config)
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    (source / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, QUICK)
    argv = ["compress", source, "--recipe", recipe, "-o", tmp_path / "o", *([] if stream else ["--no-stream"])]
    assert why in refused(capsys, argv, tmp_path, tmp_path / "o")


def test_export_refuses_a_recipe_linked_from_outside_the_checkpoint(ckpt, tmp_path, capsys):
    secret = tmp_path / "private.yaml"
    secret.write_text("token: hf_secret\n")
    (ckpt / "recipe.yaml").unlink()
    (ckpt / "recipe.yaml").symlink_to(secret)
    argv = ["export", ckpt, "--hub", "me/x", "--base-model", "org/tiny", "--dry-run", "-o", tmp_path / "hub"]
    assert "outside the checkpoint folder" in refused(capsys, argv, tmp_path, tmp_path / "hub")


def test_adapter_discovery_is_thread_safe(monkeypatch):
    """Threads asking for an adapter while another discovers wait for every adapter, instead of finding none."""
    import threading
    import time

    from moecompress.models import registry

    registered = dict(registry._ADAPTERS)
    monkeypatch.setattr(registry, "_ADAPTERS", {})
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_import_adapters", lambda: time.sleep(0.3) or registry._ADAPTERS.update(registered))
    found, errors = [], []

    def ask():
        try:
            found.append(registry.get_adapter("qwen3_moe"))
        except Exception as exc:  # noqa: BLE001 - the failure this test is about
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(found) == 8


def test_concurrent_evaluations_of_one_record_keep_every_result(tmp_path):
    import multiprocessing

    from moecompress.evaluation.records import RunRecord, add_evaluation, read_record

    record = tmp_path / "run.json"
    add_evaluation(record, "ppl", {}, RunRecord(name="m", model="m"))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_many, args=(record, w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(w.exitcode == 0 for w in workers)
    assert len(read_record(record).evaluations["ppl"]) == 80


def _add_many(record: Path, worker: int) -> None:
    from moecompress.evaluation.records import add_evaluation

    for i in range(20):
        add_evaluation(record, "ppl", {f"data-{worker}-{i}": {"ppl": 1.0}})


def test_a_folder_without_tokenizer_or_with_a_foreign_one(capsys, tmp_path, model_dir):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    assert "has no tokenizer files" in refused(
        capsys, ["compress", bare, "-o", tmp_path / "o"], tmp_path, tmp_path / "o"
    )
    vocab = {w: i for i, w in enumerate(["a", "b", "c", "d", "[UNK]"])}
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, "[UNK]")), unk_token="[UNK]"
    ).save_pretrained(bare)
    assert "has 5 tokens for a model of 8192" in refused(
        capsys, ["compress", bare, "-o", tmp_path / "o"], tmp_path, tmp_path / "o"
    )


def test_an_output_name_too_long_for_the_file_system(capsys, tmp_path, model_dir, no_model_load):
    out = tmp_path / ("x" * 250)
    assert "has 250 bytes" in refused(capsys, ["compress", model_dir, "-o", out], tmp_path, out)


@pytest.mark.parametrize("name", ["eval.json", "eval.JSONL"])
def test_json_evaluation_files_are_read_as_json(tmp_path, model_dir, name):
    from transformers import AutoTokenizer

    from moecompress.calibration.data import read_texts, token_stream
    from moecompress.evaluation.perplexity import evaluation_stream

    texts = read_texts(str(require_shared(CALIB)))[:3]
    data = tmp_path / name
    lines = [json.dumps({"text": t}) for t in texts]
    data.write_text(f"[{', '.join(lines)}]" if name.endswith(".json") else "\n".join(lines))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert evaluation_stream(str(data), tokenizer).tolist() == token_stream(texts, tokenizer).tolist()


def test_seq_len_above_the_model_positions_is_refused(capsys, ckpt):
    msg = refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI, "--seq-len", "4096"], ckpt.parent)
    assert "above the model's 2048 positions" in msg


def test_a_manifest_without_format_is_called_damaged(capsys, ckpt):
    _rewrite_manifest(ckpt, lambda m: m.pop("format"))
    msg = refused(capsys, ["eval", "ppl", ckpt, "--data", WIKI], ckpt.parent)
    assert "manifest is damaged" in msg and "upgrade" not in msg


def test_a_failed_streamed_run_says_what_it_kept(capsys, tmp_path, nan_model):
    recipe = write_recipe(tmp_path, QUICK)
    argv = ["compress", nan_model, "--recipe", recipe, "-o", tmp_path / "o"]
    msg = refused(capsys, argv, tmp_path, tmp_path / "o", kept="o.compress-state")
    assert "finished layer 0 is kept in" in msg and "o.compress-state" in msg


@pytest.mark.parametrize("delay", [0.2, 1.5])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, model_dir, delay):
    """While the package imports (torch, transformers) and just after: status 130, one line, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from _moecompress_cli import main; main()",
            "compress",
            model_dir,
            "-o",
            tmp_path / "o",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=120)[1]
    lines = err.strip().splitlines()
    assert child.returncode == 130 and lines[-1].startswith("error: interrupted") and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
