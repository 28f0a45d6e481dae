"""Expert-importance metrics from `ExpertStats` (pure functions) and their JSON / heatmap report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..calibration.stats import ExpertStats

METRICS = {
    "frequency": "share of the modality's tokens routed to the expert",
    "routing_weight": "mean top-k routing weight per token of the modality (0 when not routed)",
    "output_contribution": "share of the routed block output energy ||sum_k w_k y_k||^2 the expert's weighted output carries",
    "drop_loss": "relative reconstruction error of the routed block output when the expert is removed and its tokens re-routed",
}


def expert_importance(stats: ExpertStats) -> dict[str, torch.Tensor]:
    """Each metric as a [layers, experts, modalities] tensor (NaN where a modality has no tokens)."""
    tokens = stats.total_tokens[:, None, :]
    energy = stats.block_output_norm_sum[:, None, :]
    nan_if_empty = torch.where(tokens > 0, 1.0, float("nan"))
    return {
        "frequency": stats.tokens / tokens.clamp(min=1) * nan_if_empty,
        "routing_weight": stats.weight_sum / tokens.clamp(min=1) * nan_if_empty,
        "output_contribution": stats.output_norm_sum / energy.clamp(min=1e-30) * nan_if_empty,
        "drop_loss": stats.drop_loss / energy.clamp(min=1e-30) * nan_if_empty,
    }


def rare_experts(stats: ExpertStats, threshold: float = 0.005) -> list[dict]:
    """Experts receiving less than `threshold` of all token->expert assignments of their layer."""
    share = stats.tokens.sum(-1) / stats.tokens.sum(dim=(1, 2))[:, None].clamp(min=1)
    rows, cols = torch.where(share < threshold)
    return [{"layer": stats.layers[int(i)], "expert": int(e), "share": float(share[i, e])} for i, e in zip(rows, cols)]


def write_analysis(stats: ExpertStats, output: str | Path) -> Path:
    """expert_stats.safetensors, importance.json and one heatmap PNG per metric (layers x experts, per modality)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    stats.save(output)
    metrics = expert_importance(stats)
    present = [m for m, name in enumerate(stats.modalities) if stats.total_tokens[:, m].sum() > 0]
    report = {
        "model": stats.model,
        "layers": stats.layers,
        "num_experts": stats.num_experts,
        "top_k": stats.top_k,
        "tokens_per_modality": {stats.modalities[m]: int(stats.total_tokens[0, m]) for m in present},
        "metric_definitions": METRICS,
        "metrics": {
            metric: {stats.modalities[m]: _nan_to_none(values[:, :, m].tolist()) for m in present}
            for metric, values in metrics.items()
        },
        "rare_experts": rare_experts(stats),
    }
    (output / "importance.json").write_text(json.dumps(report, indent=2))
    for metric, values in metrics.items():
        _heatmap(
            values, [stats.modalities[m] for m in present], present, stats.layers, metric, output / f"{metric}.png"
        )
    return output


def _nan_to_none(rows: list[list[float]]) -> list[list[float | None]]:
    return [[None if v != v else v for v in row] for row in rows]


def _heatmap(
    values: torch.Tensor, names: list[str], columns: list[int], layers: list[int], metric: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(columns), figsize=(1.2 + 0.45 * values.shape[1] * len(columns), 1.5 + 0.4 * len(layers)), squeeze=False
    )
    for ax, m, name in zip(axes[0], columns, names):
        image = ax.imshow(values[:, :, m].numpy(), aspect="auto", cmap="viridis")
        ax.set_title(f"{metric} ({name})", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
