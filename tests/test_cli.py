from moecompress.cli import main


def test_wrong_model_path_is_a_clear_error(capsys, tmp_path):
    assert main(["compress", str(tmp_path / "missing-model"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_folder_without_config_is_a_clear_error(capsys, tmp_path):
    assert main(["eval", "ppl", str(tmp_path), "--data", "x.txt"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_unknown_recipe_key_is_a_clear_error(capsys, tmp_path, tiny_text_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization:\n  group: 64\n")
    assert main(["compress", str(tiny_text_path), "--recipe", str(recipe), "-o", str(tmp_path / "o")]) == 2
    assert "Did you mean 'group_size'" in capsys.readouterr().err


def _copy(folder, dest):
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_eval_results_go_to_the_checkpoint_record_or_to_record_file(compressed_tiny_text, tiny_text_path, tmp_path):
    import json

    from moecompress.evaluation.records import read_record

    from .conftest import WIKI

    ckpt = _copy(compressed_tiny_text[1], tmp_path / "ckpt")
    assert main(["eval", "ppl", str(ckpt), "--data", str(WIKI), "--max-windows", "2"]) == 0
    ppl = read_record(ckpt).evaluations["ppl"]["wikitext-2/test"]
    assert ppl["windows"] == 2 and 20 < ppl["ppl"] < 200
    assert (
        main(
            [
                "eval",
                "ppl",
                str(tiny_text_path),
                "--data",
                str(WIKI),
                "--max-windows",
                "2",
                "--record",
                str(tmp_path / "bf16.json"),
                "--name",
                "bf16",
            ]
        )
        == 0
    )
    base = read_record(tmp_path / "bf16.json")
    assert (
        base.name == "bf16"
        and base.expert_bits_per_param == 16
        and base.evaluations["ppl"]["wikitext-2/test"]["windows"] == 2
    )
    assert not (tiny_text_path / "run.json").exists()
    assert json.loads((ckpt / "moecompress.json").read_text())["format"] == "moecompress"

    (ckpt / "run.json").unlink()  # a checkpoint from before run records: the manifest fills the record
    assert main(["eval", "ppl", str(ckpt), "--data", str(WIKI), "--max-windows", "1"]) == 0
    record = read_record(ckpt)
    assert record.recipe == "test-w4" and record.base_model == str(tiny_text_path) and record.expert_bits_per_param > 4


def test_export_needs_a_target_and_converts_without_hub(compressed_tiny_text, tmp_path, capsys):
    _, out = compressed_tiny_text
    assert main(["export", str(out), "-o", str(tmp_path / "x")]) == 2
    assert "--format compressed-tensors|gptq" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    assert (tmp_path / "ct" / "model.safetensors").is_file() and not (tmp_path / "x").exists()


def test_eval_ppl_runs_packed_experts_on_the_native_kernels_with_float32_activations(
    compressed_tiny_text, tmp_path, monkeypatch
):
    """No dense copies of the experts (a 30B MoE's would take 120 GB), and the same perplexity as the dense
    path to float32 rounding: the evaluation turns the int8 activations off."""
    import json

    from moecompress import cli
    from moecompress.evaluation.perplexity import perplexity
    from moecompress.runtime import native
    from moecompress.runtime.packed_experts import PackedExperts

    from .conftest import WIKI

    if native.library() is None:
        import pytest

        pytest.skip("no native kernels here")
    seen = {}

    def spy(model, tokenizer, *args, **kwargs):
        packed = [m for m in model.modules() if isinstance(m, PackedExperts)]
        seen["cached"] = any(m[0].gate_proj.cache_dequantized for m in packed)
        seen["int8_tokens"] = native.INT8_TOKENS
        return perplexity(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr("moecompress.evaluation.perplexity.perplexity", spy)
    out = tmp_path / "r.json"
    args = ["eval", "ppl", str(compressed_tiny_text[1]), "--data", str(WIKI), "--max-windows", "2", "--no-record"]
    assert cli.main([*args, "--json", str(out)]) == 0
    assert seen == {"cached": False, "int8_tokens": 0} and native.INT8_TOKENS > 0
    native_ppl = json.loads(out.read_text())["result"]["wikitext-2/test"]["ppl"]
    model, processor, _ = cli._load_for_eval(str(compressed_tiny_text[1]), False, cache_dequantized=True)
    dense = perplexity(model, processor, str(WIKI), max_windows=2, progress=False).ppl
    assert abs(native_ppl / dense - 1) < 1e-5


def test_eval_efficiency_says_what_ran_the_dense_layers(compressed_tiny_text, capsys):
    import json

    from .conftest import WIKI

    ckpt = str(compressed_tiny_text[1])
    common = ["--data", str(WIKI), "--prefill-tokens", "16", "--decode-tokens", "2", "--decode", "eager", "--no-record"]
    kernels = {}
    for choice in ("auto", "torch"):
        assert main(["eval", "efficiency", ckpt, *common, "--dense-kernels", choice]) == 0
        kernels[choice] = json.loads(capsys.readouterr().out)["result"]["dense_kernels"]
    from moecompress.runtime import native

    assert kernels["torch"] == "torch"
    assert ("dense GEMV" in kernels["auto"]) == (native.library() is not None)
