import json

import pytest

from moecompress.cli import main
from moecompress.errors import CheckpointError
from moecompress.evaluation.records import RunRecord, add_evaluation, read_record, write_record
from moecompress.report import Metric, pareto_front, recovery, write_report


def test_recovery_is_100_at_parity_and_direction_aware():
    assert recovery(Metric("ppl:w", 40.0, False), Metric("ppl:w", 50.0, False)) == pytest.approx(80.0)
    assert recovery(Metric("lm_eval:t", 0.5, True), Metric("lm_eval:t", 0.45, True)) == pytest.approx(90.0)
    assert recovery(Metric("vlqa:e", 0.9, True), Metric("vlqa:e", 0.9, True)) == pytest.approx(100.0)


def test_pareto_front_keeps_only_undominated_points():
    points = [(10.0, 50.0), (5.0, 60.0), (12.0, 55.0), (30.0, 44.0), (6.0, 70.0)]
    assert pareto_front(points) == [1, 0, 3]


def test_records_merge_results_and_reject_foreign_json(tmp_path):
    path = tmp_path / "r.json"
    add_evaluation(path, "ppl", {"wiki": {"ppl": 44.8}}, RunRecord(name="bf16", model="m"))
    add_evaluation(path, "ppl", {"code": {"ppl": 17.0}})
    add_evaluation(path, "efficiency", {"checkpoint_bytes": 10})
    record = read_record(path)
    assert record.evaluations == {
        "ppl": {"wiki": {"ppl": 44.8}, "code": {"ppl": 17.0}},
        "efficiency": {"checkpoint_bytes": 10},
    }
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a moecompress run record"):
        read_record(tmp_path / "other.json")
    with pytest.raises(CheckpointError, match="no run record"):
        read_record(tmp_path / "missing")


def test_unwritable_record_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="--no-record"):
        write_record(RunRecord(name="x", model="m"), blocker / "sub" / "r.json")


def _record(name, ppl, size, acc, bits=None):
    return RunRecord(
        name=name,
        model=name,
        method=name,
        expert_bits_per_param=bits,
        bit_allocation={"layers": [0, 1], "values": [[4, 2, 3], [2, 2, 4]]} if bits else None,
        importance={"layers": [0, 1], "values": [[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]]} if bits else None,
        evaluations={
            "ppl": {"wiki": {"ppl": ppl}},
            "lm_eval": {"mc": {"acc": acc}},
            "efficiency": {
                "checkpoint_bytes": size,
                "bits_per_param": 1.0,
                "expert_bits_per_param": 1.0,
                "active_params_per_token": 1e6,
                "expert_activation_ratio": 0.25,
                "load_seconds": 0.1,
                "prefill_tokens_per_s": 100.0,
                "decode_tokens_per_s": 10.0,
            },
        },
    )


def test_report_files_tables_and_figures(tmp_path):
    base = _record("bf16", 40.0, 30e6, 0.60)
    runs = [_record("w4", 41.0, 12e6, 0.59, bits=4.19), _record("lp2.5", 44.0, 10e6, 0.54, bits=2.69)]
    written = write_report(runs, tmp_path / "rep", base)
    md = written["markdown"].read_text()
    assert "| w4 | w4 | 4.19 | 12.00 | 41.00 (97.6 %) | 0.5900 (98.3 %) | 97.9 |" in md
    assert "| bf16 | bf16 |  | 30.00 | 40.00 | 0.6000 | 100.0 |" in md
    html = written["html"].read_text()
    assert html.count("data:image/png;base64,") == 6  # pareto, recovery, bits + importance for both runs
    for name in ("pareto", "recovery", "bits_w4", "importance_lp2.5"):
        assert written[name].read_bytes()[:4] == b"\x89PNG"


def test_cli_report_reads_folders_and_json(tmp_path, capsys):
    write_record(_record("bf16", 40.0, 30e6, 0.6), tmp_path / "bf16.json")
    (tmp_path / "ckpt").mkdir()
    write_record(_record("w4", 41.0, 12e6, 0.59, bits=4.19), tmp_path / "ckpt")
    assert (
        main(["report", str(tmp_path / "ckpt"), "--base", str(tmp_path / "bf16.json"), "-o", str(tmp_path / "out")])
        == 0
    )
    assert (tmp_path / "out" / "report.html").is_file()
    assert main(["report", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out2")]) == 2
    assert "no run record" in capsys.readouterr().err
