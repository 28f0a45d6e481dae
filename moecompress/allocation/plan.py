"""`CompressionPlan`: the format of every routed expert projection, as produced by an allocator."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..formats import QuantFormat
from ..models.base import PROJECTIONS


@dataclass
class CompressionPlan:
    """choice[l, e, p] indexes `formats` for layer `layers[l]`, expert e, projection p (gate, up, down)."""

    layers: list[int | str]  # block keys (`MoEBlockView.key`)
    choice: torch.Tensor
    formats: list[QuantFormat]
    method: str = "uniform"
    details: dict = field(default_factory=dict)

    @classmethod
    def uniform(cls, layers: list[int | str], num_experts: int, fmt: QuantFormat) -> CompressionPlan:
        return cls(list(layers), torch.zeros(len(layers), num_experts, len(PROJECTIONS), dtype=torch.long), [fmt])

    def layer_formats(self, layer: int | str) -> list[dict[str, QuantFormat]]:
        row = self.choice[self.layers.index(layer)]
        return [{p: self.formats[int(row[e, i])] for i, p in enumerate(PROJECTIONS)} for e in range(row.shape[0])]

    @property
    def bits(self) -> torch.Tensor:
        """Code bits [L, E, P] of each entry (1.6 for base-3 ternary)."""
        return torch.tensor([f.code_bits for f in self.formats], dtype=torch.float64)[self.choice]

    @property
    def average_bits(self) -> float:
        """Mean code bits per expert parameter (all routed experts of a model have the same shape;
        gate/up/down have equal parameter counts)."""
        return float(self.bits.mean())

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "formats": [f.to_dict() for f in self.formats],
            "choice": self.choice.tolist(),
            "format_names": [f.name for f in self.formats],
            "method": self.method,
            "average_bits": self.average_bits,
            "details": self.details,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        try:
            data = json.loads(Path(path).expanduser().read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"cannot read the plan '{path}' ({type(exc).__name__}: {exc}); create one with `moecompress plan`."
            ) from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = "plan") -> CompressionPlan:
        try:
            formats = [QuantFormat.from_dict(f) for f in data["formats"]]
            plan = cls(
                [x if isinstance(x, str) else int(x) for x in data["layers"]],  # block keys: 3, or "3.image"
                torch.tensor(data["choice"], dtype=torch.long),
                formats,
                data.get("method", "unknown"),
                data.get("details", {}),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot read the plan '{path}' ({type(exc).__name__}: {exc}); create one with `moecompress plan`."
            ) from None
        if (
            plan.choice.dim() != 3
            or plan.choice.shape[0] != len(plan.layers)
            or plan.choice.shape[2] != len(PROJECTIONS)
            or plan.choice.numel() == 0
            or int(plan.choice.min()) < 0
            or int(plan.choice.max()) >= len(formats)
        ):
            raise CheckpointError(
                f"the plan '{path}' is malformed: 'choice' must be [layers, experts, 3] indices into "
                f"its {len(formats)} formats; create it again with `moecompress plan`."
            )
        return plan

    def check_fits(self, layers: list[int | str], num_experts: int, where: str = "plan") -> CompressionPlan:
        """Raise unless the plan covers exactly these MoE layers with `num_experts` experts each."""
        if list(self.layers) != list(layers) or self.choice.shape[1] != num_experts:
            raise CheckpointError(
                f"the {where} covers MoE layers {self.layers} with {self.choice.shape[1]} experts, but "
                f"the model has layers {list(layers)} with {num_experts}; make the plan from this model "
                "(and the same merge settings) with `moecompress plan`."
            )
        return self

    def table(self) -> str:
        """Per layer: mean bits and how many experts sit at each expert-mean bit width."""
        lines = [
            f"plan: {self.method}, average {self.average_bits:.3f} bits per expert parameter (+ scales/zeros)",
            "layer | mean bits | experts by mean bits",
        ]
        for i, layer in enumerate(self.layers):
            per_expert = self.bits[i].mean(dim=1)
            values, counts = per_expert.unique(return_counts=True)
            spread = ", ".join(f"{v:g}b x{c}" for v, c in zip(values.tolist(), counts.tolist()))
            lines.append(f"{layer:5d} | {float(per_expert.mean()):9.3f} | {spread}")
        return "\n".join(lines)

    def heatmap(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        per_expert = self.bits.mean(dim=2).numpy()
        fig, ax = plt.subplots(figsize=(1.5 + 0.4 * per_expert.shape[1], 1.5 + 0.4 * per_expert.shape[0]))
        image = ax.imshow(per_expert, aspect="auto", cmap="magma")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
        ax.set_title(f"bits per expert ({self.method}, avg {self.average_bits:.2f})", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
