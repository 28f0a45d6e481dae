"""Layer-wise calibration: capture the first decoder layer's inputs, then walk the decoder one layer at
a time (only that layer on the compute device), observing every routed expert through a hook on its
MoE block, letting the caller compress the layer, and recomputing the layer's outputs so that the
next layer sees the compressed model's activations (error propagation)."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import Ranks
from ..errors import RecipeError, UnsupportedModelError
from ..models.base import MODALITIES, ModelAdapter, MoEBlockView
from ..models.loading import LoadedModel
from ..storage.tensorfiles import DiskTensors
from .data import CalibrationBatch
from .stats import ExpertStats, GramSums


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def _lean_experts(model: nn.Module):
    """Run the fused experts as transformers' per-expert loop while calibrating: its grouped-GEMM path gathers
    [tokens x top-k, hidden] copies, ~5x the block's input (270 MB for 4096 tokens at top-4, H=1024, vs 55 MB),
    and is no faster on CPU."""
    current = getattr(model.config, "_experts_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_experts_implementation"):
        yield
        return
    model.set_experts_implementation("eager")
    try:
        yield
    finally:
        model.set_experts_implementation(current)


@dataclass
class Activations:
    """How calibration activations are held between layers: in `dtype` (None: the model's), and in memory or, with
    `spill_to`, on disk in that folder (one file per batch, read back one at a time)."""

    dtype: torch.dtype | None = None
    spill_to: Path | None = None


@dataclass
class LayerInputs:
    """Per calibration batch: hidden states entering the current layer (held as `holding` says, computed in
    `compute` dtype), every decoder layer's keyword arguments (position embeddings, the mask of its attention
    type: full, sliding, chunked, linear), adapter extras (e.g. DeepStack features), each token's modality id."""

    kwargs: list[list[dict]] = field(default_factory=list)  # [batch][layer]
    carried: dict[int, str] = field(default_factory=dict)  # layer -> its argument taking the layer before's state
    state: list = field(default_factory=list)  # per batch: the state the last kept layer handed on
    pending: list = field(default_factory=list)  # per batch: the state of the layer computed last
    extras: list[dict] = field(default_factory=list)
    modalities: list[torch.Tensor] = field(default_factory=list)  # per token its modality id (`MODALITIES`)
    sources: list[str] = field(default_factory=list)  # per batch the data it came from (`CalibrationBatch.source`)
    holding: Activations = field(default_factory=Activations)
    device: torch.device = torch.device("cpu")
    compute: torch.dtype | None = None
    hidden: list[torch.Tensor] | DiskTensors = field(default_factory=list)
    _sink: object = None
    _previous: DiskTensors | None = None
    _generation: int = 0

    def sink(self) -> list[torch.Tensor] | DiskTensors:
        """An empty container for the next layer's activations (append `held(out)` to it, then `keep` it)."""
        if self.holding.spill_to is None:
            self._sink = []
        else:  # a folder per generation; `keep` deletes each one two generations later
            self._generation += 1
            self._sink = DiskTensors(self.holding.spill_to / f"generation-{self._generation}", self.device)
        return self._sink

    def held(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.holding.dtype) if self.holding.dtype is not None else hidden

    def keep(self, hidden) -> None:
        """Make `hidden` the current activations: a container from `sink` as it is, anything else copied into one."""
        if hidden is self.hidden:
            return
        if self.carried:
            self.state = self.pending
        if hidden is not self._sink:
            sink = self.sink()
            for h in hidden:
                sink.append(self.held(h.to(self.device)))
            hidden = sink
        stale, old, self.hidden = self._previous, self.hidden, hidden
        self._previous = old if isinstance(old, DiskTensors) else None
        if stale is not None:
            stale.remove()

    def batches(self, layer: int):
        """(hidden in the compute dtype, decoder layer `layer`'s own keyword arguments, extras, modality ids) per
        calibration batch."""
        self.pending = []
        for b, (hidden, kwargs, extras, mask) in enumerate(zip(self.hidden, self.kwargs, self.extras, self.modalities)):
            kwargs = kwargs[layer]
            if layer in self.carried:  # the state the previous layer handed on, as the model's loop passes it
                if len(self.state) != len(self.kwargs):
                    raise UnsupportedModelError(
                        f"decoder layer {layer} takes a state from the layer before, which a resumed walk does not "
                        "have (it is not stored); delete the run's .compress-state folder to start over."
                    )
                kwargs = {**kwargs, self.carried[layer]: self.state[b]}
            yield hidden.to(self.compute) if self.compute is not None else hidden, kwargs, extras, mask

    def output(self, out) -> torch.Tensor:
        """A decoder layer's hidden states; a state it hands the next layer (DSA's top-k indices) kept aside."""
        if isinstance(out, tuple):
            if self.carried:
                self.pending.append(out[1])
            return out[0]
        return out

    @property
    def num_tokens(self) -> int:
        return sum(int(m.numel()) for m in self.modalities)

    def token_weights(self, modality_weights: dict[str, float]) -> list[torch.Tensor]:
        """Per batch each token's weight (mean 1) when every calibration source counts the same, whatever its token
        count, and within one each modality by `modality_weights` (a VLM's few image+text items weigh as much as
        its text windows, and their image tokens as much as their text)."""
        unknown = set(modality_weights) - set(MODALITIES)
        if unknown:
            raise RecipeError(f"modality_weights: unknown modalities {sorted(unknown)}; use {list(MODALITIES)}")
        lam = torch.tensor([max(modality_weights.get(m, 0.0), 0.0) for m in MODALITIES], dtype=torch.float64)
        per_source = {}
        for source in sorted(set(self.sources)):
            counts = sum(
                torch.bincount(m.reshape(-1).cpu(), minlength=len(MODALITIES)).double()
                for m, s in zip(self.modalities, self.sources)
                if s == source
            )
            share = lam * (counts > 0)
            per_source[source] = share / share.sum().clamp(min=1e-30) / counts.clamp(min=1)
        weights = [per_source[s][m.long().cpu()] for m, s in zip(self.modalities, self.sources)]
        total = sum(float(w.sum()) for w in weights)
        if total <= 0:
            raise RecipeError("modality_weights give zero weight to every modality in the calibration data.")
        return [(w * (self.num_tokens / total)).float().to(m.device) for w, m in zip(weights, self.modalities)]


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[CalibrationBatch],
    device: torch.device,
    holding: Activations | None = None,
) -> LayerInputs:
    """Run the model's embedding pass on every batch and record, per batch, the first decoder layer's input and
    each decoder layer's keyword arguments as the model passes them (layers with their own attention type get their
    own mask). The layers themselves are not run (stand-ins pass the hidden states through), so a streamed model
    needs no layer weights. Where the model's loop takes (hidden states, state) from each layer and hands the state
    to the next (DSA indexers sharing their top-k), the stand-ins return a marker state, and the argument that
    receives it is recorded (`LayerInputs.carried`)."""
    try:
        return _capture(model, adapter, batches, device, holding, hands_state=False)
    except (TypeError, ValueError) as first:
        try:
            return _capture(model, adapter, batches, device, holding, hands_state=True)
        except (TypeError, ValueError):
            raise first from None


class _Handed:
    """The marker state a stand-in hands on: the argument of the next layer that receives it is the carried one."""


def _capture(model, adapter, batches, device, holding, hands_state: bool) -> LayerInputs:
    layers = adapter.decoder_layers(model)
    captured = LayerInputs(holding=holding or Activations(), device=device)
    captured.hidden = captured.sink()
    moved: dict[int, object] = {}  # one copy per distinct argument object: layers of one type share their mask
    handed, shapes = _Handed(), []

    def text_model_hook(module, args, kwargs):
        captured.extras.append(_to(adapter.capture_extras(kwargs), device))

    def stand_in(index: int):
        named = list(inspect.signature(type(layers[index]).forward).parameters)[2:]  # after self, hidden_states

        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs.update(zip(named, args[1:]))  # further positional inputs (Gemma 4's per-layer input) by name
            if index == 0:
                captured.compute = hidden.dtype
                captured.hidden.append(captured.held(hidden.to(device)))
                captured.kwargs.append([])
                shapes.append(hidden.shape)
            for name in [k for k, v in kwargs.items() if v is handed]:
                captured.carried[index] = name
                kwargs[name] = None
            captured.kwargs[-1].append({k: _moved(v, device, moved) for k, v in kwargs.items()})
            if index == len(layers) - 1:
                raise _StopForward
            return (hidden, handed) if hands_state else hidden

        return forward

    handle = adapter.text_model(model).register_forward_pre_hook(text_model_hook, with_kwargs=True)
    for index, layer in enumerate(layers):
        layer.forward = stand_in(index)
    try:
        for batch in batches:
            try:
                model(**_to(batch.inputs, device), use_cache=False)
            except _StopForward:
                pass
            captured.modalities.append(_modalities(model, adapter, batch).to(device))
            captured.sources.append(batch.source)
            _check_positions(model, shapes[-1], captured.modalities[-1])
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward
    return captured


def _check_positions(model: nn.Module, shape: torch.Size, modality: torch.Tensor) -> None:
    """The decoder sees one position per input token (statistics are kept per token, with its modality)."""
    if shape[: modality.dim()] != modality.shape:  # (DeepSeek-V4's hyper-connections add a dimension after)
        raise UnsupportedModelError(
            f"{type(model).__name__}: its decoder sees {tuple(shape[: modality.dim()])} positions for input tokens "
            f"{tuple(modality.shape)} (a diffusion canvas or a resampler); calibration counts tokens as the input has "
            "them, so this family needs a family file."
        )


def _modalities(model: nn.Module, adapter: ModelAdapter, batch: CalibrationBatch) -> torch.Tensor:
    """Each token's modality id (`MODALITIES`: 0 text, 1 image, 2 audio): the batch's image mask, and audio
    where the adapter finds audio tokens in the input ids."""
    ids = batch.image_mask.long()
    input_ids = batch.inputs.get("input_ids")
    if input_ids is not None:
        ids = ids.masked_fill(adapter.audio_token_mask(model, input_ids).to(ids.device), MODALITIES.index("audio"))
    return ids


def _moved(value, device: torch.device, moved: dict[int, object]):
    """`value` on `device`, moved once however many layers receive the same object."""
    if id(value) not in moved:
        moved[id(value)] = (_to(value, device), value)  # keep `value` alive so that its id stays unique
    return moved[id(value)][0]


@torch.no_grad()
def forward_layer(layer: nn.Module, adapter: ModelAdapter, index: int, inputs: LayerInputs):
    """The layer's outputs for every batch, in a container from `inputs.sink()` (for `inputs.keep`)."""
    outputs = inputs.sink()
    for hidden, kwargs, extras, _ in inputs.batches(index):
        out = inputs.output(layer(hidden, **kwargs))
        outputs.append(inputs.held(adapter.after_layer(index, out, extras)))
    return outputs


# What an observer can collect beyond routing counts and output norms, on request of the methods that read it:
# "hessian": per expert the Gram of its inputs (gate/up) and of its intermediate (down), GPTQ's H;
# "drop_loss": per expert the block-output change when it is removed from the routing (importance analysis).
STATISTICS = ("hessian", "drop_loss")


def check_statistics(statistics) -> frozenset[str]:
    unknown = set(statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown calibration statistics {sorted(unknown)}; the observer collects {STATISTICS}")
    return frozenset(statistics)


class ExpertObserver:
    """Accumulates, for one MoE block, per-expert routing statistics from the tokens the router actually sends to
    each expert, and the `statistics` the methods of the run asked for (`STATISTICS`); keeps a seeded random
    reservoir of block inputs for experts that see too few tokens."""

    def __init__(
        self,
        view: MoEBlockView,
        total_tokens: int,
        statistics=frozenset({"hessian"}),
        reservoir_size: int = 2048,
        seed: int = 0,
        collectors: Callable[[MoEBlockView], list] | None = None,
    ):
        self.view = view
        E, M = view.num_experts, len(MODALITIES)
        self.statistics = check_statistics(statistics)
        self.collect_hessians = "hessian" in self.statistics
        self.measure_drop_loss = "drop_loss" in self.statistics
        self.tokens = torch.zeros(E, M, dtype=torch.float64)
        self.weight_sum = torch.zeros(E, M, dtype=torch.float64)
        self.output_norm_sum = torch.zeros(E, M, dtype=torch.float64)
        self.drop_loss = torch.zeros(E, M, dtype=torch.float64)
        self.total_tokens = torch.zeros(M, dtype=torch.float64)
        self.block_output_norm_sum = torch.zeros(M, dtype=torch.float64)
        self.hessian_in, self.hessian_mid = GramSums(), GramSums()
        self.reservoir: list[torch.Tensor] = []
        self._reservoir_rate = min(1.0, reservoir_size / max(total_tokens, 1))
        self._generator = torch.Generator().manual_seed(seed)
        self.modality: torch.Tensor | None = None  # the current batch's modality ids
        self.token_weight: torch.Tensor | None = None  # and its tokens' weights in `weighted` and the Grams
        self.weighted = torch.zeros(E, 2, dtype=torch.float64)  # per expert: sum of token weights, of weight x routing
        self.weighted_total = 0.0
        self.collectors = collectors(view) if collectors is not None else []
        self._observing = False

    def attach(self) -> torch.utils.hooks.RemovableHandle:
        """Watch the block (routing recomputed with `view.route`), or the experts module where the adapter reads
        routing at the experts' inputs (`observes_routing`: the model's own top-k indices and weights)."""
        if self.view.adapter.observes_routing:
            return self.view.experts.register_forward_hook(self.experts_hook, with_kwargs=True)
        return self.view.block.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        hidden = args[0].reshape(-1, self.view.hidden_size)
        if self.view.group is None:
            weight = None if self.token_weight is None else self.token_weight.reshape(-1)
            self.observe(hidden, self.modality.reshape(-1), weight)
        else:  # a modality group's block sees only that modality's tokens (each counting 1)
            self.observe(
                hidden, torch.full((hidden.shape[0],), MODALITIES.index(self.view.group), device=hidden.device)
            )

    def experts_hook(self, module, args, kwargs, output) -> None:
        if self._observing:  # the observer's own calls of the experts (drop-loss re-routing)
            return
        hidden, indices, weights = (*args, *kwargs.values())[:3]
        modality = self.modality.reshape(-1)
        if hidden.shape[0] != modality.shape[0]:
            raise UnsupportedModelError(
                f"{self.view.name}: its experts see {hidden.shape[0]} tokens of a batch of {modality.shape[0]}; "
                "this family routes a subset of tokens and needs a family file."
            )
        weight = None if self.token_weight is None else self.token_weight.reshape(-1)
        if not self.view.adapter.rule_checked:  # the first batch: which routing rule the model's router follows
            self.view.adapter.recognize_routing(self.view.block, hidden, weights, indices)
        self._observing = True
        try:
            self.observe(hidden, modality, weight, chosen=(weights, indices))
        finally:
            self._observing = False

    @torch.no_grad()
    def observe(
        self,
        x: torch.Tensor,
        modality: torch.Tensor,
        token_weight: torch.Tensor | None = None,
        chosen: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Tokens x [T, H] entering the block, their modality ids (or a bool image mask) [T] and weights [T] (in
        `weighted` and the Grams; default 1); `chosen`: their top-k (weights, indices) as the model's router gave
        them (default: recomputed with `view.route`)."""
        x, modality, token_weight = self.prepared(x, modality, token_weight)
        weights, indices = chosen if chosen is not None else self.view.route(x)
        routed = torch.zeros_like(x)
        self.observe_experts(x, modality, token_weight, (weights, indices), range(self.view.num_experts), routed)
        self.observe_tokens(x, modality, token_weight)
        self.observe_output(modality, routed)
        if self.measure_drop_loss:
            self._observe_drop_loss(x, modality, weights, indices, routed)

    def prepared(self, x, modality, token_weight):
        """`x` in float32, `modality` as ids and `token_weight` on its device, as `observe` takes them."""
        x = x.float()
        return x, modality.long().to(x.device), token_weight.to(x.device) if token_weight is not None else None

    def observe_experts(self, x, modality, token_weight, chosen, experts: range, routed: torch.Tensor) -> None:
        """`observe`'s part for the experts `experts` (the chunk a streamed layer holds), their weighted outputs
        added to `routed` [T, H]."""
        M = len(MODALITIES)
        weights, indices = chosen[0].float(), chosen[1]
        for e in experts:
            tok, slot = torch.where(indices == e)
            if tok.numel() == 0:
                continue
            routing = weights[tok, slot].float()
            xe, w = self.view.expert_inputs(x[tok], routing)  # w: what the output is summed with
            mid, out = self.view.expert_forward(e, xe)
            contribution = w[:, None] * out
            routed.index_add_(0, tok, contribution)
            m = modality[tok]
            self.tokens[e] += torch.bincount(m, minlength=M).double().cpu()
            self.weight_sum[e] += torch.bincount(m, weights=routing, minlength=M).double().cpu()
            self.output_norm_sum[e] += torch.bincount(m, weights=contribution.pow(2).sum(1), minlength=M).double().cpu()
            t = token_weight[tok] if token_weight is not None else torch.ones_like(routing)
            self.weighted[e] += torch.stack([t.sum(), (t * routing).sum()]).double().cpu()
            if self.collect_hessians:  # unweighted tokens enter as they are (no copy on the common path)
                root = token_weight[tok].sqrt()[:, None] if token_weight is not None else None
                self.hessian_in.add(e, xe if root is None else xe * root)
                self.hessian_mid.add(e, mid if root is None else mid * root)
            for collector in self.collectors:
                collector.observe_expert(self.view, e, xe, w, out)

    def observe_tokens(self, x, modality, token_weight) -> None:
        """`observe`'s part per batch that needs no expert: token counts and the reservoir."""
        self.total_tokens += torch.bincount(modality, minlength=len(MODALITIES)).double().cpu()
        self.weighted_total += float(token_weight.sum()) if token_weight is not None else x.shape[0]
        n_keep = math.ceil(self._reservoir_rate * x.shape[0])
        picks = torch.randperm(x.shape[0], generator=self._generator)[:n_keep]
        self.reservoir.append(x[picks.to(x.device)].cpu())

    def observe_output(self, modality, routed: torch.Tensor) -> None:
        """`observe`'s part per batch from the block's routed output, summed over all experts."""
        M = len(MODALITIES)
        self.block_output_norm_sum += torch.bincount(modality, weights=routed.pow(2).sum(1), minlength=M).double().cpu()

    def _observe_drop_loss(self, x, modality, weights, indices, routed) -> None:
        """||Z - Z_-e||^2 where only the tokens routed to e change: they are re-routed without e."""
        E = self.view.num_experts
        for e in range(E):
            tok = torch.where((indices == e).any(dim=1))[0]
            if tok.numel() == 0:
                continue
            excluded = torch.zeros(E, dtype=torch.bool)
            excluded[e] = True
            w2, idx2 = self.view.route(x[tok], excluded)
            rerouted = self.view.routed_forward(x[tok], idx2, w2)
            err = (routed[tok] - rerouted).pow(2).sum(1)
            self.drop_loss[e] += torch.bincount(modality[tok], weights=err, minlength=len(MODALITIES)).double().cpu()

    def reservoir_tokens(self) -> torch.Tensor:
        return torch.cat(self.reservoir) if self.reservoir else torch.empty(0)


def collect_expert_stats(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[CalibrationBatch],
    source: str,
    measure_drop_loss: bool = True,
    walk: Walk | None = None,
) -> ExpertStats:
    """Calibration pass without changing the model: routing, output and drop-loss statistics per expert,
    and whatever `walk.collectors(view)` gather per layer (e.g. the allocator's `ErrorProfile`)."""
    views = adapter.moe_blocks(model)
    sizes = [v.expert_params // v.num_experts for v in views]
    stats = ExpertStats.empty(source, [v.key for v in views], views[0].num_experts, views[0].top_k, sizes)

    def record(view: MoEBlockView, observer: ExpertObserver) -> bool:
        stats.record(view.key, observer)
        return False

    statistics = frozenset({"drop_loss"} if measure_drop_loss else ())
    walk = replace(walk or Walk(desc="analyze"), statistics=statistics)
    run_layerwise(model, adapter, batches, record, walk)
    stats.merge_ranks(walk.ranks)
    return stats


LayerCallback = Callable[[MoEBlockView, ExpertObserver], bool]
LayerDone = Callable[[int, nn.Module, list[torch.Tensor]], None]


@dataclass
class Walk:
    """How `run_layerwise` walks the decoder.

    statistics: what each MoE block's observer collects for the methods of the run (`STATISTICS`).
    collectors: per block, extra collectors the observer feeds (e.g. the allocator's `ErrorProfile`).
    reservoir_size: block inputs kept per layer for experts that see too few tokens.
    layers_from: hands out the layers (a `StreamedModel` reads each from disk; default: the model's own).
    on_layer_done(index, layer, outputs): sees every finished layer before it is released (outputs may be
        `DiskTensors`: files that stay until two layers later).
    resume: (first layer, its inputs): the layers before it are skipped.
    activations: how activations are held between layers (dtype, memory or disk); each layer still computes in the
        model's dtype.
    keep_changes: later passes see the layers this one changed (a streamed model keeps them on disk).
    balance: modality weights with which each observer weighs its tokens (`LayerInputs.token_weights`; default:
        every token 1).
    chunks: per decoder layer whose routed experts do not fit at once, the experts worked on at a time (a streamed
        model reads them so from its source; `on_moe_layer` then sees each chunk, `view.held`, in turn).
    ranks: the job's ranks; with several, every MoE layer is worked on in chunks, each rank its share of the experts
        (`Ranks.share`), and the ranks exchange the experts' outputs."""

    device: str | torch.device = "cpu"
    statistics: frozenset[str] = frozenset({"hessian"})
    progress: bool = True
    desc: str = "layers"
    collectors: Callable[[MoEBlockView], list] | None = None
    reservoir_size: int = 2048
    layers_from: LoadedModel | None = None
    on_layer_done: LayerDone | None = None
    resume: tuple[int, list[torch.Tensor] | DiskTensors] | None = None
    activations: Activations | None = None
    keep_changes: bool = False
    balance: dict[str, float] | None = None
    chunks: dict[int, int] | None = None
    ranks: Ranks = Ranks()

    def chunk(self, index: int, experts: int) -> int | None:
        """Experts per chunk in decoder layer `index` of `experts` routed experts (None: the whole layer at once)."""
        size = (self.chunks or {}).get(index)
        if not self.ranks.multi:
            return size
        return min(size or experts, len(self.ranks.share(experts)))


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[CalibrationBatch],
    on_moe_layer: LayerCallback,
    walk: Walk | None = None,
) -> None:
    """Walk the decoder as `walk` says; `on_moe_layer(view, observer)` sees each MoE block after its calibration pass
    (each of a layer's blocks, where it has one per modality) and returns True when it changed the layer (then the
    layer's outputs are recomputed)."""
    walk = walk or Walk()
    with _lean_experts(model):
        device = torch.device(walk.device)
        source = walk.layers_from if walk.layers_from is not None else LoadedModel(model, adapter, "")
        source.prepare_layers(device)
        inputs = capture_layer_inputs(model, adapter, batches, device, walk.activations)
        source.after_capture()
        weights = inputs.token_weights(walk.balance) if walk.balance is not None else None
        first = 0
        if walk.resume is not None:
            first = walk.resume[0]
            inputs.keep(walk.resume[1])
        views = adapter.moe_blocks_by_layer(model)
        count = len(adapter.decoder_layers(model))
        options = dict(statistics=walk.statistics, reservoir_size=walk.reservoir_size, collectors=walk.collectors)
        for index in tqdm(range(first, count), desc=walk.desc, disable=not walk.progress, initial=first, total=count):
            blocks, changed = views.get(index, []), False
            size = walk.chunk(index, blocks[0].num_experts) if blocks else None
            layer = source.load_layer(index, device) if size is None else source.load_layer(index, device, False)
            if not blocks:
                inputs.keep(forward_layer(layer, adapter, index, inputs))
            elif size is not None:
                observer = ExpertObserver(blocks[0], inputs.num_tokens, seed=index, **options)
                chunked = ChunkedLayer(source, index, blocks[0], observer, walk.ranks)
                inputs.keep(chunked.run(layer, inputs, size, on_moe_layer, weights))
                changed = True
            else:
                observers = [ExpertObserver(view, inputs.num_tokens, seed=index, **options) for view in blocks]
                outputs = _observed_forward(layer, adapter, index, inputs, observers, weights)
                source.trim()
                for view in blocks:
                    changed = on_moe_layer(view, observers.pop(0)) or changed
                    source.trim()
                if changed:  # the outputs of the layer before the change are stale: freed before recomputing
                    if isinstance(outputs, DiskTensors):
                        outputs.remove()
                    del outputs
                    outputs = forward_layer(layer, adapter, index, inputs)
                inputs.keep(outputs)
            if walk.on_layer_done is not None:
                walk.on_layer_done(index, layer, inputs.hidden)
            source.release_layer(index, changed=walk.keep_changes and changed)


def _observed_forward(layer, adapter: ModelAdapter, index: int, inputs: LayerInputs, observers: list, weights=None):
    """`forward_layer` with each of `observers` watching its MoE block of the layer (`weights`: per batch its tokens'
    weights)."""
    handles = [observer.attach() for observer in observers]
    try:
        outputs = inputs.sink()
        for b, (hidden, kwargs, extras, modality) in enumerate(inputs.batches(index)):
            for observer in observers:
                observer.modality = modality
                observer.token_weight = None if weights is None else weights[b]
            out = inputs.output(layer(hidden, **kwargs))
            outputs.append(inputs.held(adapter.after_layer(index, out, extras)))
        return outputs
    finally:
        for handle in handles:
            handle.remove()


class ChunkedLayer:
    """One decoder layer whose routed experts are read, observed and changed a chunk at a time (`Walk.chunks`). The
    layer runs once with its experts recording their inputs (hidden states and the model's own routing); each chunk
    of experts is then read from the source, observed on every batch, handed to `on_moe_layer`, and its summed
    output added per batch in expert order, each expert through the experts module's own forward on the same rows
    as the whole module computes them, so the sums are bit for bit the whole module's; the layer then runs again
    with its experts answering those sums. With several `ranks`, each works on its share of the experts and keeps
    each expert's output per (token, top-k slot); the ranks sum those (every slot is one rank's), and each adds them
    up in expert order as one rank does."""

    def __init__(
        self, source: LoadedModel, index: int, view: MoEBlockView, observer: ExpertObserver, ranks: Ranks = Ranks()
    ):
        self.source, self.index, self.view, self.observer, self.ranks = source, index, view, observer, ranks
        self.recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def run(self, layer, inputs: LayerInputs, size: int, on_moe_layer: LayerCallback, weights=None):
        """The layer's outputs for every batch (as `forward_layer` gives them), chunks of `size` experts."""
        view, observer, ranks = self.view, self.observer, self.ranks
        self._walk(layer, inputs, self._record)
        recorded, self.recorded = self.recorded, []
        routed = [torch.zeros_like(h, dtype=torch.float32) for h, _, _ in recorded]
        summed = [torch.zeros_like(h) for h, _, _ in recorded]
        slots = [h.new_zeros(*i.shape, h.shape[-1]) for h, i, _ in recorded] if ranks.multi else summed
        prepared = [
            observer.prepared(
                hidden, inputs.modalities[b].reshape(-1), None if weights is None else weights[b].reshape(-1)
            )
            for b, (hidden, _, _) in enumerate(recorded)
        ]
        for x, modality, token_weight in prepared:
            observer.observe_tokens(x, modality, token_weight)
        own = ranks.share(view.num_experts)
        for first in range(own.start, own.stop, size):
            chunk = range(first, min(first + size, own.stop))
            self.source.load_experts(self.index, chunk, inputs.device)
            for (x, modality, token_weight), (_, indices, routing), out in zip(prepared, recorded, routed):
                observer.observe_experts(x, modality, token_weight, (routing, indices), chunk, out)
            on_moe_layer(view, observer)
            for (hidden, indices, routing), out in zip(recorded, slots):
                _add_experts_output(view.experts, hidden, indices, routing, chunk, out, per_slot=ranks.multi)
            self.source.release_experts(self.index)
        for (_, modality, _), out in zip(prepared, routed):
            observer.observe_output(modality, ranks.summed(out))  # (summed in another order than one rank's)
        if ranks.multi:
            for (_, indices, _), out, total in zip(recorded, slots, summed):
                _sum_slots(indices, ranks.summed(out), total)
        del recorded, routed, prepared, slots
        return self._walk(layer, inputs, lambda b, hidden, *_: _checked(summed[b], hidden), keep=True)

    def _record(self, batch: int, hidden, indices, routing) -> torch.Tensor:
        """The first pass's answer: the experts' inputs kept (on the first batch the generic adapter recognizes the
        router's rule from them), zeros returned (that pass's layer outputs are not used)."""
        if batch == 0 and not getattr(self.view.adapter, "rule_checked", True):
            self.view.adapter.recognize_routing(self.view.block, hidden, routing, indices)
        self.recorded.append((hidden, indices, routing))
        return torch.zeros_like(hidden)

    def _walk(self, layer, inputs: LayerInputs, answer, keep: bool = False):
        """Run the layer on every batch with its experts module answering `answer(batch, hidden, indices, weights)`;
        the layer's outputs (in a sink) with `keep`."""
        experts, batch = self.view.experts, [0]

        def forward(*args, **kwargs):
            return answer(batch[0], *(*args, *kwargs.values())[:3])

        experts.forward = forward
        outputs = inputs.sink() if keep else None
        try:
            for b, (hidden, kwargs, extras, _) in enumerate(inputs.batches(self.index)):
                batch[0] = b
                out = inputs.output(layer(hidden, **kwargs))
                if keep:
                    outputs.append(inputs.held(self.view.adapter.after_layer(self.index, out, extras)))
            return outputs
        finally:
            del experts.forward


def _add_experts_output(
    experts, hidden, indices, routing, chunk: range, out: torch.Tensor, per_slot: bool = False
) -> None:
    """Add to `out` [T, H] the weighted outputs of the experts in `chunk` (those `experts` holds), in expert order,
    each computed by the module's own forward on the rows, in the order, that the whole module gives it; with
    `per_slot`, write each to its (token, top-k slot) of `out` [T, k, H] instead."""
    for e in chunk:
        slot, tok = torch.where((indices == e).T)  # as the module's one-hot mask [k, T] orders them
        if tok.numel() == 0:
            continue
        local = torch.full((tok.numel(), 1), e - chunk.start, dtype=indices.dtype, device=indices.device)
        values = experts(hidden[tok], local, routing[tok, slot][:, None]).to(out.dtype)
        if per_slot:
            out[tok, slot] = values
        else:
            out.index_add_(0, tok, values)


def _sum_slots(indices: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> None:
    """Add to `out` [T, H] every expert's outputs kept per (token, slot) in `slots` [T, k, H], in expert order as
    `_add_experts_output` adds them."""
    for e in torch.unique(indices).tolist():
        slot, tok = torch.where((indices == e).T)
        out.index_add_(0, tok, slots[tok, slot])


def _checked(summed: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    if summed.shape != hidden.shape:
        raise UnsupportedModelError(
            f"the experts saw {tuple(hidden.shape)} on the second pass of a chunked layer and {tuple(summed.shape)} on "
            "the first; this family cannot be worked on in chunks (raise --max-memory to hold whole layers)."
        )
    return summed
