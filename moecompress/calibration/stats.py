"""`ExpertStats`: what calibration measured about every routed expert, saved for later stages."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..models.base import MODALITIES

_TENSOR_FIELDS = ("tokens", "weight_sum", "output_norm_sum", "drop_loss", "total_tokens", "block_output_norm_sum")
_PROFILE_FIELDS = ("quant_error", "profile_tokens")


class GramSums:
    """Per-expert sums of x^T x over the tokens routed to each expert (GPTQ's input Hessians), held as their lower
    triangles: half the memory of full matrices (Qwen3-30B-A3B: 1.2 GB less per layer). `pop` rebuilds the full
    symmetric matrix (the upper triangle mirrored from the lower)."""

    def __init__(self):
        self._lower: dict[int, torch.Tensor] = {}
        self._index: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _flat(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions of the lower triangle of an n x n matrix, and of its mirror image."""
        key = (n, str(device))
        if key not in self._index:
            row, col = torch.tril_indices(n, n, device=device)
            self._index[key] = (row * n + col, col * n + row)
        return self._index[key]

    def add(self, expert: int, x: torch.Tensor) -> None:
        lower = (x.T @ x).view(-1)[self._flat(x.shape[1], x.device)[0]]
        if expert in self._lower:
            self._lower[expert] += lower
        else:
            self._lower[expert] = lower

    def full(self, expert: int) -> torch.Tensor | None:
        lower = self._lower.get(expert)
        if lower is None:
            return None
        n = math.isqrt(8 * lower.numel() + 1) // 2  # n (n + 1) / 2 = numel
        out = torch.empty(n * n, dtype=lower.dtype, device=lower.device)
        below, above = self._flat(n, lower.device)
        out[above] = lower
        out[below] = lower
        return out.view(n, n)

    def pop(self, expert: int) -> torch.Tensor | None:
        """The full sum for `expert`, forgotten here (each expert's is freed as GPTQ uses it)."""
        full = self.full(expert)
        self._lower.pop(expert, None)
        return full


@dataclass
class ExpertStats:
    """Per layer l, expert e and modality m (`MODALITIES`):

    tokens[l, e, m]           token->expert assignments
    weight_sum[l, e, m]       sum of the expert's top-k routing weights
    output_norm_sum[l, e, m]  sum over its tokens of ||routing_weight * expert_output||^2
    drop_loss[l, e, m]        sum over tokens of ||Z - Z_without_e||^2 (Z: routed block output, the
                              expert removed and its tokens re-routed); NaN when not measured
    total_tokens[l, m], block_output_norm_sum[l, m]: normalisers (tokens through the block, sum ||Z||^2)
    quant_error[l, e, c, p]   error profile (when measured): sum over the expert's profiled tokens of
                              ||routing_weight * (y_quantized - y)||^2 with candidate format c applied by
                              RTN to projection p (0 gate, 1 up, 2 down) or, for p = 3, to all three
    profile_tokens[l, e]      tokens the profile was measured on
    expert_params[l]          weights of one routed expert of block l (blocks of one model may differ: ERNIE-4.5-VL)
    Blocks are named by their keys (`MoEBlockView.key`): layer indices, or "layer.group" for modality groups.
    """

    model: str
    layers: list[int | str]
    num_experts: int
    top_k: int
    tokens: torch.Tensor
    weight_sum: torch.Tensor
    output_norm_sum: torch.Tensor
    drop_loss: torch.Tensor
    total_tokens: torch.Tensor
    block_output_norm_sum: torch.Tensor
    modalities: tuple[str, ...] = MODALITIES
    candidate_formats: list[dict] = field(default_factory=list)
    quant_error: torch.Tensor | None = None
    profile_tokens: torch.Tensor | None = None
    hessians: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    expert_params: list[int] | None = None

    @classmethod
    def empty(
        cls, model: str, layers: list[int | str], num_experts: int, top_k: int, expert_params: list[int] | None = None
    ) -> ExpertStats:
        shape = (len(layers), num_experts, len(MODALITIES))
        return cls(
            model=model,
            layers=list(layers),
            num_experts=num_experts,
            top_k=top_k,
            expert_params=expert_params,
            tokens=torch.zeros(shape, dtype=torch.float64),
            weight_sum=torch.zeros(shape, dtype=torch.float64),
            output_norm_sum=torch.zeros(shape, dtype=torch.float64),
            drop_loss=torch.full(shape, float("nan"), dtype=torch.float64),
            total_tokens=torch.zeros(len(layers), len(MODALITIES), dtype=torch.float64),
            block_output_norm_sum=torch.zeros(len(layers), len(MODALITIES), dtype=torch.float64),
        )

    def row(self, layer: int | str) -> int:
        return self.layers.index(layer)

    def record(self, layer: int | str, observer) -> None:
        """Copy what an `ExpertObserver` accumulated for `layer`."""
        i = self.row(layer)
        for name in ("tokens", "weight_sum", "output_norm_sum"):
            getattr(self, name)[i] = getattr(observer, name)
        if observer.measure_drop_loss:
            self.drop_loss[i] = observer.drop_loss
        self.total_tokens[i] = observer.total_tokens
        self.block_output_norm_sum[i] = observer.block_output_norm_sum
        for collector in observer.collectors:  # e.g. the allocator's error profile
            collector.record(self, i)

    def merge_ranks(self, ranks) -> None:
        """After an expert-parallel walk (`distributed.Ranks`), where each rank observed its share of the experts:
        every expert's row from the rank that observed it (the others hold zeros there)."""
        for name in ("tokens", "weight_sum", "output_norm_sum", *_PROFILE_FIELDS):
            if getattr(self, name) is not None:
                ranks.summed(getattr(self, name))

    @property
    def frequency(self) -> torch.Tensor:
        """Share of a modality's tokens routed to each expert, [L, E, M] (sums to top_k over experts)."""
        return self.tokens / self.total_tokens[:, None, :].clamp(min=1)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            k: getattr(self, k)
            for k in ("model", "layers", "num_experts", "top_k", "modalities", "candidate_formats", "expert_params")
        }
        tensors = {
            k: getattr(self, k).contiguous() for k in _TENSOR_FIELDS + _PROFILE_FIELDS if getattr(self, k) is not None
        }
        save_file(tensors, str(folder / "expert_stats.safetensors"), metadata={"moecompress": json.dumps(meta)})
        if self.hessians:
            save_file({k: v.contiguous() for k, v in self.hessians.items()}, str(folder / "hessians.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> ExpertStats:
        from safetensors import safe_open

        path = Path(folder) / "expert_stats.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: run `moecompress analyze` to create expert statistics.")
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["moecompress"])
        tensors = load_file(str(path))
        hessian_path = Path(folder) / "hessians.safetensors"
        hessians = load_file(str(hessian_path)) if hessian_path.is_file() else {}
        meta["modalities"] = tuple(meta["modalities"])
        return cls(**meta, **tensors, hessians=hessians)
