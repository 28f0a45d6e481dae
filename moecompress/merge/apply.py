"""Merging and pruning routed experts of a loaded model, layer by layer on calibration data.

Each MoE block is reduced after its calibration pass, so later layers calibrate on the reduced model.
Router after merging: `shrink` gives the block one router row per merged expert (the frequency-weighted
mean of its members' rows), a plain transformers model with fewer experts; `keep` keeps all E router
rows and maps each to its merged expert (`MappedExperts`; saved in the checkpoint's `expert_maps`).
Pruning always removes the router rows of the removed experts; the remaining top-k weights are
renormalised exactly as the model's router does (softmax over the remaining rows, then its own
`norm_topk_prob`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calibration.data import CalibrationBatch
from ..calibration.engine import Activations, ExpertObserver, Walk, run_layerwise
from ..errors import RecipeError
from ..models.base import BIASES, MODALITIES, PROJECTIONS, ExpertWeights, MoEBlockView, modality_weights_problem
from ..models.loading import LoadedModel
from ..runtime.packed_experts import MappedExperts
from .cluster import cluster_experts, group_around_dominant
from .prune import select_experts_to_prune
from .subspace import align_neurons, average_merge, subspace_merge

MERGE_METHODS = ("none", "average", "subspace", "prune")
CLUSTERINGS = ("kmeans", "dominant")
ROUTER_MODES = ("shrink", "keep")


@dataclass
class MergeConfig:
    """Remove `ratio` of the routed experts of every MoE layer.

    method: average (frequency-weighted mean per cluster) | subspace (Sub-MoE joint SVD at `rank`, a
            fraction of the full rank when <= 1) | prune (NAEE: drop the experts whose removal changes
            the block output least; beam search of width `beam`, exhaustive when cheap) | none.
    clustering: kmeans (spherical k-means on the cosine similarity of expert outputs on `sample_tokens`
            block inputs, k-means++ init) | dominant (MC-SMoE: the most frequently routed experts anchor
            the clusters, the others join the most similar anchor).
    align_neurons: permute each member's intermediate neurons to match the cluster's most frequent
            expert before merging (function-preserving; element-wise merges then combine like with like).
    """

    method: str = "none"
    ratio: float = 0.25
    rank: float = 0.5
    router: str = "shrink"
    clustering: str = "dominant"
    sample_tokens: int = 2048
    beam: int = 4
    align_neurons: bool = True
    max_cluster_size: int | None = None
    modality_weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "image": 1.0, "audio": 1.0})
    seed: int = 0

    def validate(self) -> MergeConfig:
        problems = []
        if self.method not in MERGE_METHODS:
            problems.append(f"merge.method '{self.method}': use one of {list(MERGE_METHODS)}")
        if self.clustering not in CLUSTERINGS:
            problems.append(f"merge.clustering '{self.clustering}': use one of {list(CLUSTERINGS)}")
        if self.router not in ROUTER_MODES:
            problems.append(f"merge.router '{self.router}': use one of {list(ROUTER_MODES)}")
        if not 0 < self.ratio < 1:
            problems.append(f"merge.ratio {self.ratio}: the fraction of routed experts to remove, in (0, 1)")
        if self.rank <= 0:
            problems.append(f"merge.rank {self.rank}: a positive rank, or a fraction of the full rank in (0, 1]")
        if self.sample_tokens < 1 or self.beam < 1 or (self.max_cluster_size is not None and self.max_cluster_size < 1):
            problems.append(
                f"merge.sample_tokens {self.sample_tokens}, beam {self.beam}, max_cluster_size "
                f"{self.max_cluster_size}: use 1 or more (max_cluster_size may be null: 2 x the mean cluster size)"
            )
        problems.append(modality_weights_problem(self.modality_weights, "merge"))
        problems = [p for p in problems if p]
        if problems:
            raise RecipeError("; ".join(problems))
        return self

    def kept(self, num_experts: int, top_k: int) -> int:
        kept = num_experts - round(self.ratio * num_experts)
        if kept < top_k:
            raise RecipeError(
                f"merge.ratio {self.ratio} leaves {kept} experts but the router picks top-{top_k}; lower the ratio."
            )
        if self.method != "prune" and self.max_cluster_size is not None and self.max_cluster_size * kept < num_experts:
            raise RecipeError(
                f"merge.max_cluster_size {self.max_cluster_size}: {kept} clusters of at most that many cannot hold "
                f"{num_experts} experts; raise it to {-(-num_experts // kept)} or more, or lower merge.ratio."
            )
        return kept


@dataclass
class LayerReduction:
    layer: int | str  # the block's key
    kept: int
    slot_map: list[int]
    error: float | None = None


def expert_frequencies(observer: ExpertObserver, modality_weights: dict[str, float]) -> torch.Tensor:
    lam = torch.tensor([modality_weights.get(m, 0.0) for m in MODALITIES], dtype=torch.float64)
    freq = observer.tokens / observer.total_tokens.clamp(min=1)
    return (freq * lam).sum(-1)


def _sample(observer: ExpertObserver, count: int, device) -> torch.Tensor:
    tokens = observer.reservoir_tokens()
    if tokens.numel() == 0:
        group = observer.view.group
        raise RecipeError(
            f"no calibration tokens reached MoE block {observer.view.key}; "
            + (f"its experts take {group} tokens alone: calibrate with {group} data." if group else "check the data.")
        )
    return tokens[:count].to(device)


def _all_expert_outputs(view: MoEBlockView, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([view.expert_forward(e, x)[1] for e in range(view.num_experts)])


def merge_block(view: MoEBlockView, observer: ExpertObserver, config: MergeConfig) -> LayerReduction:
    """Replace the block's experts by cluster merges (or drop pruned ones) and update its router."""
    E, k = view.num_experts, config.kept(view.num_experts, view.top_k)
    x = _sample(observer, config.sample_tokens, view.device)
    outputs = _all_expert_outputs(view, x.float())
    freqs = expert_frequencies(observer, config.modality_weights)
    originals = [view.expert_weights(e) for e in range(E)]
    if config.method == "prune":
        removed, error = select_experts_to_prune(
            outputs, lambda excluded: view.route(x.float(), excluded), E - k, config.beam, exhaustive_limit=200
        )
        keep = [e for e in range(E) if e not in removed]
        slot_map = torch.full((E,), -1, dtype=torch.long)
        slot_map[keep] = torch.arange(k)
        _install(view, [originals[e] for e in keep], view.router_rows()[keep].clone(), None, k)
        return LayerReduction(view.key, k, slot_map.tolist(), error)
    if config.clustering == "dominant":
        labels = group_around_dominant(outputs.reshape(E, -1), freqs, k, config.max_cluster_size)
    else:
        labels = cluster_experts(outputs.reshape(E, -1), k, config.seed, max_cluster_size=config.max_cluster_size)
    merged, rows, router = [], [], view.router_rows()
    for c in range(k):
        members = torch.where(labels == c)[0].tolist()
        f = freqs[members]
        weights_of = {e: originals[e] for e in members}
        if config.align_neurons and len(members) > 1:
            anchor = members[int(torch.argmax(f))]
            weights_of = {e: w if e == anchor else align_neurons(originals[anchor], w) for e, w in weights_of.items()}
        matrices = (_merge([weights_of[e][p] for e in members], f, config) for p in PROJECTIONS)
        biases = (_merge_bias([weights_of[e][b] for e in members], f) for b in BIASES)
        merged.append(ExpertWeights(*matrices, *biases))
        weights = f / f.sum() if float(f.sum()) > 0 else torch.full_like(f, 1 / len(members))
        rows.append((weights[:, None].to(router.dtype) * router[members]).sum(0))
    keep_rows = config.router == "keep"
    _install(view, merged, None if keep_rows else torch.stack(rows), labels if keep_rows else None, k)
    return LayerReduction(view.key, k, labels.tolist())


def _merge_bias(biases: list[torch.Tensor | None], freqs: torch.Tensor) -> torch.Tensor | None:
    """The members' biases averaged with the same frequency weights as their matrices (None without biases)."""
    return None if biases[0] is None else average_merge([b[:, None] for b in biases], freqs)[:, 0]


def _merge(matrices: list[torch.Tensor], freqs: torch.Tensor, config: MergeConfig) -> torch.Tensor:
    if config.method == "average" or len(matrices) == 1:
        return average_merge(matrices, freqs)
    full_rank = min(matrices[0].shape[0], sum(m.shape[1] for m in matrices))
    rank = round(config.rank * full_rank) if config.rank <= 1 else int(config.rank)
    return subspace_merge(matrices, freqs, max(rank, 1))


@torch.no_grad()
def _install(
    view: MoEBlockView,
    experts: list[ExpertWeights],
    router_rows: torch.Tensor | None,
    slot_map: torch.Tensor | None,
    kept: int,
) -> None:
    fused = view.experts
    view.replace_experts(experts)
    for param in view.adapter.expert_parameters(fused):
        param.requires_grad_(False)
    router = view.router
    if router_rows is not None:
        view.set_router_rows(router_rows)
        router.num_experts = kept
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            raise RecipeError("merging/pruning group-limited routers (DeepSeek-V3) is not supported yet.")
    if slot_map is not None:
        view.experts = MappedExperts(fused, slot_map)


def reduce_experts(
    loaded: LoadedModel,
    batches: list[CalibrationBatch],
    config: MergeConfig,
    device: str = "cpu",
    progress: bool = True,
    activations: Activations | None = None,
) -> list[LayerReduction]:
    """Merge or prune the routed experts of every MoE layer of `loaded.model` in place."""
    config.validate()
    if config.method == "none":
        return []
    reductions: list[LayerReduction] = []
    kept: list[int] = []

    def reduce_layer(view: MoEBlockView, observer: ExpertObserver) -> bool:
        reduction = merge_block(view, observer, config)
        reductions.append(reduction)
        kept.append(reduction.kept)
        return True

    walk = Walk(
        device,
        statistics=frozenset(),
        progress=progress,
        desc=f"{config.method} experts",
        reservoir_size=config.sample_tokens,
        layers_from=loaded,
        keep_changes=True,
        activations=activations,
    )
    run_layerwise(loaded.model, loaded.adapter, batches, reduce_layer, walk)
    if config.router == "shrink" or config.method == "prune":
        loaded.adapter.set_num_experts(loaded.model, kept[0])
    return reductions
