import json

import pytest
import torch

from moecompress.analysis.importance import expert_importance, rare_experts, write_analysis
from moecompress.calibration.stats import ExpertStats


def synthetic_stats() -> ExpertStats:
    stats = ExpertStats.empty("synthetic", [0, 1], num_experts=4, top_k=2)
    stats.tokens[:, :, 0] = torch.tensor([[100.0, 61, 38.6, 0.4], [50, 50, 50, 50]])
    stats.total_tokens[:, 0] = 100
    stats.weight_sum[:, :, 0] = stats.tokens[:, :, 0] * 0.5
    stats.output_norm_sum[:, :, 0] = stats.tokens[:, :, 0]
    stats.block_output_norm_sum[:, 0] = 400
    stats.drop_loss[:, :, 0] = stats.tokens[:, :, 0] * 2
    return stats


def test_metrics_are_normalised_per_modality():
    metrics = expert_importance(synthetic_stats())
    torch.testing.assert_close(
        metrics["frequency"][0, :, 0], torch.tensor([1.0, 0.61, 0.386, 0.004], dtype=torch.float64)
    )
    assert torch.isnan(metrics["frequency"][:, :, 1]).all()  # no image tokens
    torch.testing.assert_close(metrics["drop_loss"][1, :, 0], torch.full((4,), 0.25, dtype=torch.float64))


def test_rare_experts_are_listed():
    assert rare_experts(synthetic_stats()) == [{"layer": 0, "expert": 3, "share": pytest.approx(0.002)}]


def test_report_writes_json_and_heatmaps(tmp_path):
    write_analysis(synthetic_stats(), tmp_path)
    report = json.loads((tmp_path / "importance.json").read_text())
    assert set(report["metrics"]) == {"frequency", "routing_weight", "output_contribution", "drop_loss"}
    assert list(report["metrics"]["frequency"]) == ["text"]
    assert all((tmp_path / f"{m}.png").stat().st_size > 1000 for m in report["metrics"])
