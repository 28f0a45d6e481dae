"""`CompressionPlan`: the bits of every routed expert projection, as produced by an allocator."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.base import PROJECTIONS
from ..quant.qtensor import QuantFormat


@dataclass
class CompressionPlan:
    """bits[l, e, p] for layer `layers[l]`, expert e, projection p (gate, up, down)."""

    layers: list[int]
    bits: torch.Tensor
    group_size: int = 128
    sym: bool = False
    method: str = "uniform"
    details: dict = field(default_factory=dict)

    @classmethod
    def uniform(cls, layers: list[int], num_experts: int, bits: int, group_size: int = 128, sym: bool = False) -> CompressionPlan:
        return cls(list(layers), torch.full((len(layers), num_experts, len(PROJECTIONS)), bits, dtype=torch.long), group_size, sym)

    def formats(self, layer: int) -> list[dict[str, QuantFormat]]:
        row = self.bits[self.layers.index(layer)]
        return [{p: QuantFormat(int(row[e, i]), self.group_size, self.sym) for i, p in enumerate(PROJECTIONS)} for e in range(row.shape[0])]

    @property
    def average_bits(self) -> float:
        """Mean code bits per expert parameter (all routed experts of a model have the same shape;
        gate/up/down have equal parameter counts)."""
        return float(self.bits.double().mean())

    def to_dict(self) -> dict:
        return {"layers": self.layers, "bits": self.bits.tolist(), "group_size": self.group_size, "sym": self.sym,
                "method": self.method, "average_bits": self.average_bits, "details": self.details}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["layers"], torch.tensor(data["bits"], dtype=torch.long), data["group_size"], data["sym"],
                       data.get("method", "unknown"), data.get("details", {}))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"cannot read the plan '{path}' ({exc}); create one with `moecompress plan`.") from exc

    def table(self) -> str:
        """Per layer: mean bits and how many experts sit at each expert-mean bit width."""
        lines = [f"plan: {self.method}, average {self.average_bits:.3f} bits per expert parameter (+ scales/zeros)",
                 "layer | mean bits | experts by mean bits"]
        for i, layer in enumerate(self.layers):
            per_expert = self.bits[i].double().mean(dim=1)
            values, counts = per_expert.unique(return_counts=True)
            spread = ", ".join(f"{v:g}b x{c}" for v, c in zip(values.tolist(), counts.tolist()))
            lines.append(f"{layer:5d} | {float(per_expert.mean()):9.3f} | {spread}")
        return "\n".join(lines)

    def heatmap(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        per_expert = self.bits.double().mean(dim=2).numpy()
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
