import json

import pytest
import yaml

from moecompress.cli import main
from moecompress.errors import CheckpointError, HubError
from moecompress.evaluation.records import RunRecord, add_evaluation, write_record
from moecompress.hub import prepare_hub_folder, upload

from .hub_server import HubStub


@pytest.fixture
def evaluated_checkpoint(compressed_tiny_text, tmp_path):
    """A copy of the compressed checkpoint with evaluation results in its run record, and a base record."""
    _, out = compressed_tiny_text
    ckpt = tmp_path / "tiny-w4"
    ckpt.mkdir()
    for f in out.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    add_evaluation(ckpt, "ppl", {"test": {"ppl": 45.0}})
    add_evaluation(ckpt, "lm_eval", {"moe_code_mc": {"acc": 0.6}})
    base = RunRecord(
        name="bf16",
        model="base",
        method="uncompressed",
        evaluations={"ppl": {"test": {"ppl": 44.78}}, "lm_eval": {"moe_code_mc": {"acc": 0.64}}},
    )
    write_record(base, tmp_path / "bf16.json")
    return ckpt, base


def test_card_has_hub_metadata_evaluation_with_recovery_and_loading(evaluated_checkpoint, tmp_path):
    ckpt, base = evaluated_checkpoint
    folder = prepare_hub_folder(ckpt, tmp_path / "hub", "someone/tiny-w4", base_model="org/moe-tiny-text", base=base)
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/moe-tiny-text" and meta["base_model_relation"] == "quantized"
    assert "moecompress" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    assert "| test ppl (lower is better) | 45.00 | 44.78 | 99.5 |" in card  # 44.78 / 45.00
    assert "| moe_code_mc acc | 0.6000 | 0.6400 | 93.8 |" in card
    assert 'moecompress.load(snapshot_download("someone/tiny-w4"))' in card
    assert "moecompress only" in card and "name: test-w4" in card
    assert {"model.safetensors", "config.json", "moecompress.json", "recipe.yaml", "run.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }


def test_local_base_model_path_needs_a_hub_id(evaluated_checkpoint, tmp_path):
    ckpt, _ = evaluated_checkpoint
    with pytest.raises(CheckpointError, match=r"a local path\?\): pass --base-model"):
        prepare_hub_folder(ckpt, tmp_path / "hub", "someone/tiny-w4")
    assert not (tmp_path / "hub").exists()


def test_upload_sends_create_repo_and_one_commit_with_every_file(evaluated_checkpoint, tmp_path):
    ckpt, base = evaluated_checkpoint
    folder = prepare_hub_folder(
        ckpt, tmp_path / "hub", "someone/tiny-w4", "compressed-tensors", base_model="org/moe-tiny-text", base=base
    )
    with HubStub() as hub:
        url = upload(folder, "someone/tiny-w4", private=True, token="hf_secret", endpoint=hub.endpoint)
    assert url.endswith("/someone/tiny-w4/commit/0123abcd")
    assert hub.created == [
        {
            "name": "tiny-w4",
            "organization": "someone",
            "visibility": "private",
            "type": "model",
            "authorization": "Bearer hf_secret",
        }
    ]
    assert hub.card_metadata["base_model_relation"] == "quantized"
    (commit,) = hub.commits
    assert commit["path"] == "/api/models/someone/tiny-w4/commit/main"
    sent = commit["files"]
    assert set(sent) == {p.name for p in folder.iterdir() if not p.name.startswith(".")}  # our marker stays local
    for name, content in sent.items():
        assert content == (folder / name).read_bytes(), name
    assert json.loads(sent["config.json"])["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "transformers + compressed-tensors" in sent["README.md"].decode()


def test_unreachable_hub_is_a_clear_error(evaluated_checkpoint, tmp_path):
    ckpt, _ = evaluated_checkpoint
    folder = prepare_hub_folder(ckpt, tmp_path / "hub", "someone/tiny-w4", base_model="org/moe-tiny-text")
    with HubStub() as hub:
        endpoint = hub.endpoint
    with pytest.raises(HubError, match="re-run the same export command"):
        upload(folder, "someone/tiny-w4", token="hf_x", endpoint=endpoint)


def test_cli_dry_run_writes_the_folder_and_contacts_nobody(evaluated_checkpoint, tmp_path, capsys):
    ckpt, _ = evaluated_checkpoint
    with HubStub() as hub:
        code = main(
            [
                "export",
                str(ckpt),
                "--hub",
                "someone/tiny-w4",
                "--dry-run",
                "--base-model",
                "org/moe-tiny-text",
                "--base",
                str(tmp_path / "bf16.json"),
                "--endpoint",
                hub.endpoint,
                "-o",
                str(tmp_path / "dry"),
            ]
        )
    assert code == 0 and hub.requests == []
    result = json.loads(capsys.readouterr().out)["result"]
    assert result["uploaded"] is False and "README.md" in result["files"]
    assert "recovery %" in (tmp_path / "dry" / "README.md").read_text()


def test_engines_say_mixed_precision_needs_moecompress():
    from moecompress.formats import IntFormat
    from moecompress.hub import engines

    uniform = {"quantization_config": {"formats": [IntFormat(4, 128).to_dict()], "experts": {"m": [[0, 0, 0]]}}}
    mixed = {
        "quantization_config": {
            "formats": [IntFormat(4, 128).to_dict(), IntFormat(2, 128).to_dict()],
            "experts": {"m": [[0, 0, 0], [1, 1, 1]]},
        }
    }
    assert "--format compressed-tensors|gptq" in engines("moecompress", uniform)[0]
    (only,) = engines("moecompress", mixed)
    assert only.startswith("moecompress only") and "converts" not in only
    ct = {"quantization_config": {"config_groups": {"group_0": {"weights": {"symmetric": False}}}}}
    assert "huggingface/transformers#47430" in engines("compressed-tensors", ct)[0]
