"""Dynamic expert skipping at inference: hooks on every MoE router (or experts' inputs) that drop (token, expert) pairs.

Methods (the rule is fitted on calibration data to a target fraction of skipped routed-expert
activations, then stored in the checkpoint's `quantization_config.dynamic_skip` and reinstalled by the loader):
  odp      MC ODP: skip an expert whose weight is below beta_l x the token's top weight (beta per layer).
  modes    MoDES: skip when alpha_l[modality] x weight < tau[modality]; alpha_l is the KL on the model's
           output when layer l's routed experts are all skipped (tokens of that modality), normalised to
           mean 1 over layers; separate text/image thresholds chosen along the frontier of equal skip
           ratio by the calibration KL (`per_modality: false`: one shared threshold).
  learned  MC# OTP-style top-any mask: a linear predictor per layer on [hidden, log(weight / top weight)]
           (initialised as the ODP rule) decides which of the non-top experts to keep; trained with KL to the unskipped model +
           penalty x expected kept fraction (Gumbel-sigmoid, straight-through), then its cut is set to hit
           the target. The top expert of a token is always kept.
Skipped pairs get index E (transformers' "no expert" slot) and weight 0: they are not computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.data import CalibrationBatch
from ..errors import RecipeError
from ..models.base import ModelAdapter, MoEBlockView
from ..training.distill import DistillConfig, distill, token_kl
from .rules import ratio_keep, relaxed_bernoulli, score_keep, threshold_for_fraction, top_slot

SKIP_METHODS = ("none", "odp", "modes", "learned")


# Skipping tells text from image tokens (audio tokens count as text).
SKIP_MODALITIES = ("text", "image")


@dataclass
class SkipConfig:
    """Fit a skipping rule that removes `target` of the routed-expert activations on calibration data."""

    method: str = "none"
    target: float = 0.3
    per_modality: bool = True
    frontier_points: int = 7
    steps: int = 200
    lr: float = 1e-2
    penalty: float = 0.05
    temperature: float = 0.5
    seed: int = 0

    def validate(self) -> SkipConfig:
        if self.method not in SKIP_METHODS:
            raise RecipeError(f"skip.method '{self.method}': use one of {list(SKIP_METHODS)}")
        if not 0 < self.target < 1:
            raise RecipeError(f"skip.target {self.target}: the fraction of expert activations to skip, in (0, 1)")
        if self.frontier_points < 1 or self.steps < 1 or self.lr <= 0 or self.penalty < 0 or self.temperature <= 0:
            raise RecipeError("skip: frontier_points, steps, lr and temperature must be positive, penalty >= 0.")
        return self


@dataclass
class SkipRule:
    """A fitted rule, as stored in the checkpoint. Per-layer lists follow the model's MoE blocks in order."""

    method: str
    target: float
    beta: list[float] | None = None
    alpha: dict[str, list[float]] | None = None
    tau: dict[str, float] | None = None
    cut: float | None = None
    calibration_kl: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> SkipRule:
        return cls(**data)


class SkipPredictor(nn.Module):
    """Keep-logits for a token's top-k slots (sorted by weight) from [hidden, log(weight / top weight)].
    It starts as the ODP rule (logit = log ratio + 3, so nearly everything is kept) and learns
    hidden-state-dependent corrections."""

    def __init__(self, hidden_size: int, top_k: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size + top_k, top_k)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, hidden_size:].copy_(torch.eye(top_k))
            self.linear.bias.fill_(3.0)

    def forward(self, hidden: torch.Tensor, sorted_weights: torch.Tensor) -> torch.Tensor:
        w = sorted_weights.float().clamp(min=1e-9)
        log_ratio = (w / w[:, :1]).log()
        features = torch.cat([hidden.float(), log_ratio], dim=-1)
        return self.linear(features.to(self.linear.weight.dtype)).float()


@dataclass
class SkipStats:
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_MODALITIES, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_MODALITIES, 0))

    def skipped(self, modality: str | None = None) -> float:
        names = SKIP_MODALITIES if modality is None else (modality,)
        total = int(sum(self.total[m] for m in names))
        return 1 - int(sum(self.kept[m] for m in names)) / total if total else 0.0


class SkipController:
    """Router hooks applying a `SkipRule` to a model. Modes: apply (default), off, train (learned masks with
    gradients), collect (record routing weights), ("drop", position, modality) (skip every expert of one
    MoE layer for the tokens of one modality)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, rule: SkipRule):
        self.model, self.adapter, self.rule = model, adapter, rule
        self.views: list[MoEBlockView] = adapter.moe_blocks(model)
        self.mode: str | tuple = "apply"
        self.stats = SkipStats()
        self.records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.views]
        self.penalties: list[torch.Tensor] = []
        self.generator: torch.Generator | None = None
        self.temperature = 0.5
        self._image_mask: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._see_inputs, with_kwargs=True)]
        for position, view in enumerate(self.views):
            self._handles.append(routing_hook(view, self._make_hook(position, view)))
        # transformers' grouped/batched expert kernels only mask "no expert" slots (index E) in their
        # expert-parallel mode; otherwise those rows are left uninitialised and NaN * 0 leaks through.
        self._sentinel_safe = [
            m
            for view in self.views
            for m in view.experts.modules()
            if hasattr(m, "_is_expert_parallel") and not m._is_expert_parallel
        ]
        for module in self._sentinel_safe:
            module._is_expert_parallel = True
        model.skip_controller = self

    @property
    def predictors(self) -> list[SkipPredictor]:
        return [view.block.skip_predictor for view in self.views]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._sentinel_safe:
            module._is_expert_parallel = False
        self._sentinel_safe = []
        if getattr(self.model, "skip_controller", None) is self:
            del self.model.skip_controller

    @contextmanager
    def set_mode(self, mode: str | tuple):
        previous, self.mode = self.mode, mode
        try:
            yield self
        finally:
            self.mode = previous

    def reset_stats(self) -> None:
        self.stats = SkipStats()

    def _see_inputs(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        self._image_mask = None if input_ids is None else self.adapter.image_token_mask(module, input_ids).flatten()

    def _is_image(self, tokens: int, device, view: MoEBlockView) -> torch.Tensor:
        if view.group is not None:  # a modality group's router sees that modality's tokens alone
            return torch.full((tokens,), view.group == "image", dtype=torch.bool, device=device)
        mask = self._image_mask
        if mask is None or mask.numel() != tokens:
            return torch.zeros(tokens, dtype=torch.bool, device=device)
        return mask.to(device)

    def _make_hook(self, position: int, view: MoEBlockView):
        def hook(module, args, output):
            logits, weights, indices = output
            if self.mode == "off":
                return output
            image = self._is_image(weights.shape[0], weights.device, view)
            if self.mode == "collect":
                self.records[position].append((weights.detach().float().cpu(), image.cpu()))
                return output
            if isinstance(self.mode, tuple):  # ("drop", layer position, modality)
                if self.mode[1] != position:
                    return output
                dropped = image if self.mode[2] == "image" else ~image
                keep = ~dropped[:, None].expand_as(weights)
            elif self.mode == "train":
                return logits, weights * self._train_mask(position, view, args[0], weights), indices
            else:
                keep = self._keep(position, view, args[0], weights, image)
            for m, sel in (("text", ~image), ("image", image)):  # device tensors: no host sync per layer
                self.stats.total[m] += sel.sum() * weights.shape[1]
                self.stats.kept[m] += (keep & sel[:, None]).sum()
            return logits, weights.masked_fill(~keep, 0), indices.masked_fill(~keep, view.num_experts)

        return hook

    def _keep(
        self, position: int, view: MoEBlockView, hidden: torch.Tensor, weights: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        rule = self.rule
        w = weights.float()
        if rule.method == "odp":
            return ratio_keep(w, rule.beta[position])
        if rule.method == "modes":
            alpha = torch.where(image, rule.alpha["image"][position], rule.alpha["text"][position]).to(w.dtype)
            tau = torch.where(image, rule.tau["image"], rule.tau["text"]).to(w.dtype)
            return score_keep(w, alpha, tau)
        if rule.method == "learned":
            sorted_w, order = w.sort(dim=-1, descending=True)
            logits = view.block.skip_predictor(hidden.reshape(w.shape[0], -1), sorted_w)
            keep_sorted = torch.sigmoid(logits) >= rule.cut
            keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
            return keep | top_slot(w)
        raise RecipeError(f"unknown skipping method '{rule.method}'")

    def _train_mask(
        self, position: int, view: MoEBlockView, hidden: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        sorted_w, order = weights.float().sort(dim=-1, descending=True)
        logits = view.block.skip_predictor(hidden.reshape(weights.shape[0], -1), sorted_w.detach())
        sample = relaxed_bernoulli(logits, self.temperature, self.generator)
        sample = torch.cat([torch.ones_like(sample[:, :1]), sample[:, 1:]], dim=-1)
        self.penalties.append(torch.sigmoid(logits[:, 1:]).mean())
        return torch.empty_like(sample).scatter(-1, order, sample).to(weights.dtype)

    def pop_penalty(self) -> torch.Tensor:
        value = torch.stack(self.penalties).mean()
        self.penalties = []
        return value


def _inputs(batch: CalibrationBatch, device) -> dict:
    return {k: v.to(device) for k, v in batch.inputs.items()}


@torch.no_grad()
def calibration_kl(controller: SkipController, batches: list[CalibrationBatch]) -> float:
    """Mean KL(unskipped || skipped) of the next-token distributions at the text positions of the
    calibration batches (predictions at image positions are never used) under the controller's mode."""
    model = controller.model
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        inputs = _inputs(batch, device)
        with controller.set_mode("off"):
            reference = model(**inputs, use_cache=False).logits
        kl = token_kl(model(**inputs, use_cache=False).logits, reference)
        valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(kl, dtype=torch.bool)
        if batch.image_mask is not None:
            valid &= ~batch.image_mask.to(kl.device).bool()
        total += float(kl[valid].sum())
        count += int(valid.sum())
    return total / max(count, 1)


def _collect(controller: SkipController, batches: list[CalibrationBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer: (sorted top-k weights [N, k], image mask [N]) over the calibration tokens, unskipped."""
    controller.records = [[] for _ in controller.views]
    device = next(controller.model.parameters()).device
    with torch.no_grad(), controller.set_mode("collect"):
        for batch in batches:
            controller.model(**_inputs(batch, device), use_cache=False)
    records = controller.records
    controller.records = [[] for _ in controller.views]
    return [
        (torch.cat([w for w, _ in r]).sort(dim=-1, descending=True).values, torch.cat([m for _, m in r]))
        for r in records
    ]


def _fit_odp(records, target: float) -> SkipRule:
    k = records[0][0].shape[1]
    share = target * k / (k - 1)
    if k < 2 or share > 1:
        raise RecipeError(
            f"skip.target {target}: odp always keeps a token's top expert, so at most {(k - 1) / k:.2f} "
            f"of top-{k} activations can be skipped; lower the target or use method: modes."
        )
    beta = [threshold_for_fraction(w[:, 1:] / w[:, :1].clamp(min=1e-12), share) for w, _ in records]
    return SkipRule("odp", target, beta=beta)


def _layer_importance(controller: SkipController, batches, progress: bool) -> dict[str, list[float]]:
    """alpha[modality][l]: calibration KL when MoE layer l skips all routed experts for the tokens of that
    modality, normalised to mean 1 over layers (1 everywhere for a modality the data lacks)."""
    present = {"text": True, "image": any(b.image_mask is not None and bool(b.image_mask.any()) for b in batches)}
    alpha = {}
    for m in SKIP_MODALITIES:
        if not present[m]:
            alpha[m] = [1.0] * len(controller.views)
            continue
        values = []
        for position in tqdm(range(len(controller.views)), desc=f"layer importance ({m})", disable=not progress):
            with controller.set_mode(("drop", position, m)):
                values.append(calibration_kl(controller, batches))
        values = torch.tensor(values, dtype=torch.float64)
        alpha[m] = (values / values.mean()).tolist() if float(values.mean()) > 0 else [1.0] * len(values)
    return alpha


def _fit_modes(controller: SkipController, batches, records, config: SkipConfig, progress: bool) -> SkipRule:
    alpha = _layer_importance(controller, batches, progress)
    scores = {m: [] for m in SKIP_MODALITIES}
    for position, (w, image) in enumerate(records):
        for m, sel in (("text", ~image), ("image", image)):
            scores[m].append((alpha[m][position] * w[sel]).flatten())
    scores = {m: torch.cat(s) for m, s in scores.items()}
    n_total = sum(s.numel() for s in scores.values())
    n_skip = round(config.target * n_total)
    has_image = scores["image"].numel() > 0
    if not (config.per_modality and has_image):
        tau = threshold_for_fraction(torch.cat(list(scores.values())), config.target)
        controller.rule = SkipRule("modes", config.target, alpha=alpha, tau=dict.fromkeys(SKIP_MODALITIES, tau))
        controller.rule.calibration_kl = calibration_kl(controller, batches)
        return controller.rule
    n_text, n_image = scores["text"].numel(), scores["image"].numel()
    low, high = max(0, n_skip - n_image), min(n_skip, n_text)
    candidates = sorted(
        {round(low + (high - low) * i / max(config.frontier_points - 1, 1)) for i in range(config.frontier_points)}
    )
    best = None
    for skip_text in tqdm(candidates, desc="threshold frontier", disable=not progress):
        tau = {
            "text": threshold_for_fraction(scores["text"], skip_text / n_text),
            "image": threshold_for_fraction(scores["image"], (n_skip - skip_text) / n_image),
        }
        controller.rule = SkipRule("modes", config.target, alpha=alpha, tau=tau)
        kl = calibration_kl(controller, batches)
        if best is None or kl < best.calibration_kl:
            best = SkipRule("modes", config.target, alpha=alpha, tau=tau, calibration_kl=kl)
    controller.rule = best
    return best


def _fit_learned(controller: SkipController, batches, config: SkipConfig, progress: bool, cpu: bool) -> SkipRule:
    model = controller.model
    device = next(model.parameters()).device
    for view in controller.views:
        view.block.skip_predictor = SkipPredictor(view.hidden_size, view.top_k).to(device)
    model.requires_grad_(False)
    params = [p for predictor in controller.predictors for p in predictor.parameters()]
    for p in params:
        p.requires_grad_(True)
    controller.generator = torch.Generator(device=device).manual_seed(config.seed)
    controller.temperature = config.temperature
    try:
        with controller.set_mode("train"):
            report = distill(
                model,
                None,
                batches,
                [{"params": params, "lr": config.lr}],
                DistillConfig(warmup_steps=min(10, config.steps)),
                config.steps,
                progress=progress,
                cpu=cpu,
                teacher_context=lambda: controller.set_mode("off"),
                extra_loss=lambda: config.penalty * controller.pop_penalty(),
            )
    finally:
        model.requires_grad_(False)
        model.eval()
    controller.training_report = report
    return cut_learned_mask(controller, batches, config.target)


def cut_learned_mask(controller: SkipController, batches: list[CalibrationBatch], target: float) -> SkipRule:
    """Set the learned mask's keep-probability cut so that `target` of the activations are skipped on `batches`."""
    device = next(controller.model.parameters()).device
    k = controller.views[0].top_k
    probabilities = []
    with torch.no_grad():
        for batch in batches:
            hidden_by_layer = _router_inputs(controller, batch, device)
            for view, (hidden, weights) in zip(controller.views, hidden_by_layer):
                sorted_w = weights.float().sort(dim=-1, descending=True).values
                probabilities.append(torch.sigmoid(view.block.skip_predictor(hidden, sorted_w))[:, 1:].flatten().cpu())
    share = target * k / (k - 1)
    if share > 1:
        raise RecipeError(
            f"skip.target {target}: the learned mask keeps each token's top expert; "
            f"at most {(k - 1) / k:.2f} can be skipped."
        )
    rule = SkipRule("learned", target, cut=threshold_for_fraction(torch.cat(probabilities), share))
    controller.rule = rule
    rule.calibration_kl = calibration_kl(controller, batches)
    return rule


def routing_hook(view: MoEBlockView, hook) -> torch.utils.hooks.RemovableHandle:
    """Install `hook(module, (hidden,), (logits, weights, indices))`, which may return a changed triple, on the view's
    router output; where the adapter reads routing at the experts' inputs (the generic adapter: routers differ in
    what they return), on those inputs instead (logits None)."""
    if not view.adapter.observes_routing:
        return view.router.register_forward_hook(hook)

    def before_experts(module, args, kwargs):
        hidden, indices, weights = (*args, *kwargs.values())[:3]
        out = hook(module, (hidden,), (None, weights, indices))
        return None if out is None else ((hidden, out[2], out[1]), {})

    return view.experts.register_forward_pre_hook(before_experts, with_kwargs=True)


def _router_inputs(controller: SkipController, batch, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    captured = []

    def grab(module, args, output):
        captured.append((args[0].reshape(output[1].shape[0], -1), output[1]))

    handles = [routing_hook(view, grab) for view in controller.views]
    try:
        with controller.set_mode("off"):
            controller.model(**_inputs(batch, device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def fit_skipping(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[CalibrationBatch],
    config: SkipConfig,
    progress: bool = True,
    cpu: bool = True,
) -> SkipController:
    """Fit `config.method` on `batches` and leave it installed on `model` (as `model.skip_controller`)."""
    config.validate()
    if config.method == "none":
        raise RecipeError("skip.method is none: nothing to fit.")
    existing = getattr(model, "skip_controller", None)
    if existing is not None:
        existing.remove()
    controller = SkipController(model, adapter, SkipRule(config.method, config.target))
    model.eval()
    if config.method == "learned":
        _fit_learned(controller, batches, config, progress, cpu)
        return controller
    records = _collect(controller, batches)
    if config.method == "odp":
        controller.rule = _fit_odp(records, config.target)
        controller.rule.calibration_kl = calibration_kl(controller, batches)
    else:
        _fit_modes(controller, batches, records, config, progress)
    return controller


def install_skipping(model: nn.Module, adapter: ModelAdapter, rule: SkipRule) -> SkipController:
    """Reinstall a stored rule (the loader calls this); learned predictors must already hold their weights."""
    return SkipController(model, adapter, rule)


def add_predictor_modules(model: nn.Module, adapter: ModelAdapter) -> None:
    """Empty learned-mask predictors on every MoE block, for a checkpoint's weights to load into."""
    for view in adapter.moe_blocks(model):
        view.block.skip_predictor = SkipPredictor(view.hidden_size, view.top_k)
