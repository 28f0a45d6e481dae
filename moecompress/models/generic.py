"""The adapter of every MoE whose experts class transformers builds with `use_experts_implementation` and that no
family file claims: the blocks, the router and the experts' layout are found in the module tree and the decorator's
flags; routing is observed at the experts module's inputs (the model's own router's indices and weights). Recomputing
routing (drop-loss importance, skipping, pruning's and merging's router rows) needs a router this adapter recognizes:
a top-k over a linear [E, H] with softmax or sigmoid scores, a selection bias and groups as the config says. The
calibration walk checks the recomputed routing against the observed one and refuses those methods where they differ."""

from __future__ import annotations

import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter, MoEBlockView

TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k", "num_experts_per_token", "top_k_experts")
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
WIDTH_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
GROUP_KEYS = ("n_group", "num_expert_group")
SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
RULES = tuple((scoring, renormalise) for scoring in ("softmax", "sigmoid") for renormalise in (True, False))


def is_experts_class(cls: type) -> bool:
    """Whether `cls` is an experts class made by transformers' `use_experts_implementation`."""
    forward = cls.__dict__.get("forward") if isinstance(cls, type) else None
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_filename.replace("\\", "/").endswith("transformers/integrations/moe.py")


def experts_classes(module: ModuleType) -> list[type]:
    return [
        c for c in vars(module).values() if isinstance(c, type) and issubclass(c, nn.Module) and is_experts_class(c)
    ]


def modeling_module(model_type: str) -> ModuleType | None:
    """The module of the model class transformers builds for `model_type` (causal LM or image-text-to-text), or
    None where it has neither (also for a type registered at run time with `AutoModel*.register`)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto

    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        return None
    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING, modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
        try:
            return sys.modules[mapping[config_class].__module__]
        except (KeyError, ValueError):
            continue
    return None


def has_experts_interface(model_type: str) -> bool:
    """Whether transformers builds `model_type`'s experts with `use_experts_implementation`: in its own modeling
    file, or in the family whose decoder its default text config names (Kimi-K2.5 on DeepSeek-V3)."""
    module = modeling_module(model_type)
    if module is None:
        return False
    if experts_classes(module):
        return True
    text = text_model_type(model_type)
    return text not in (None, model_type) and has_experts_interface(text)


def text_model_type(model_type: str) -> str | None:
    """The model type of `model_type`'s default text config (itself for a text model), or None."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]().get_text_config().model_type
    except Exception:  # noqa: BLE001 - a config without usable defaults names no text family
        return None


class _Seen(Exception):
    """Stops a block at its experts' inputs."""


class GenericAdapter(ModelAdapter):
    """See the module's docstring. One instance serves one model type; what it finds in a model's module tree
    (where the blocks, routers and experts sit) it keeps for the model it last looked at."""

    observes_routing = True

    def __init__(self, model_type: str):
        self.model_types = (model_type,)
        self._model: nn.Module | None = None
        self.rule: tuple[str, bool] | None = None  # the routing rule (`RULES`) the router follows, once checked
        self.rule_checked = False

    # ---- discovery -------------------------------------------------------------------------------------------------
    def _find(self, model: nn.Module) -> None:
        if self._model is model:
            return
        experts = [name for name, m in model.named_modules() if _is_experts(m)]
        lists: dict[str, list[tuple[int, str]]] = {}
        for name in experts:
            parts = name.split(".")
            index = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
            if index is None:
                continue  # experts outside a numbered layer
            block = (int(parts[index]), ".".join(parts[index + 1 : -1]), parts[-1])
            lists.setdefault(".".join(parts[:index]), []).append(block)
        if not lists:
            raise UnsupportedModelError(
                f"model_type '{self.model_types[0]}': no sparse MoE layers (no decoder layer holds an experts module "
                "of use_experts_implementation); write a family file (moecompress/models/) or a plugin (--adapter)."
            )
        if len(lists) > 1:  # the engine walks one stack of layers; the other's experts would stay as they are
            raise UnsupportedModelError(
                f"model_type '{self.model_types[0]}': experts in {len(lists)} stacks of layers ({', '.join(lists)}: "
                "a MoE vision tower, an encoder and a decoder, a second model); the generic adapter walks one stack, "
                "so this family needs a family file."
            )
        layers_name = next(iter(lists))
        self.layers_name = layers_name
        self.block_paths = {i: path for i, path, _ in lists[layers_name]}
        self.experts_name = lists[layers_name][0][2]
        layers = model.get_submodule(layers_name)
        text_name = layers_name.rpartition(".")[0]
        self.text = model.get_submodule(text_name) if text_name else model
        first = next(iter(self.block_paths.items()))
        block = layers[first[0]].get_submodule(first[1])
        _require_gated(getattr(block, self.experts_name), self.model_types[0])  # the layout ModelAdapter reads
        self.config = getattr(model.config, "text_config", None) or model.config
        self.router_name, self.router_inner = _find_router(block, self.experts_name)
        self._model, self._layers = model, layers

    def text_model(self, model: nn.Module) -> nn.Module:
        self._find(model)
        return self.text

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        self._find(model)
        return self._layers

    def moe_blocks(self, model: nn.Module) -> list[MoEBlockView]:
        self._find(model)
        return [
            MoEBlockView(
                i, ".".join(filter(None, (self.layers_name, str(i), path))), self._layers[i].get_submodule(path), self
            )
            for i, path in sorted(self.block_paths.items())
        ]

    # ---- router ------------------------------------------------------------------------------------------------------
    def router_module(self, block: nn.Module) -> nn.Module:
        if self.router_name is None:
            raise UnsupportedModelError(
                f"model_type '{self.model_types[0]}': its MoE block has no router matrix [experts, hidden] this "
                "adapter recognizes; methods that recompute or edit routing (drop-loss importance, skipping, "
                "pruning, merging) need a family file."
            )
        return block.get_submodule(self.router_name)

    def experts_shape(self, view: MoEBlockView) -> tuple[int, int]:
        return _count(view.experts), _width(view.experts)

    def router_linear(self, router: nn.Module) -> nn.Module:
        return router.get_submodule(self.router_inner) if self.router_inner else router

    def top_k(self, block: nn.Module) -> int:
        return _first(self.config, TOP_K_KEYS)

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return self.rule[1] if self.rule is not None else super().norm_topk_prob(router)

    def recognize_routing(self, block: nn.Module, hidden: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        """Find which routing rule (`RULES`) reproduces the model's own top-k `indices` and `weights` for tokens
        `hidden` [T, H] (observed at the experts' inputs); `route_block` then uses it. Where none does, or the block
        has no router matrix, `route_block` refuses in one line."""
        self.rule_checked = True
        if self.router_name is not None:
            matches = (r for r in RULES if _same_routing(*self._route(block, hidden, None, r), weights, indices))
            self.rule = next(matches, None)

    def route_block(self, block: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        if not self.rule_checked:  # not seen in calibration: watch the block route these tokens once
            self._watch(block, hidden)
        if self.rule is None:
            self.router_module(block)  # no router matrix: that refusal first
            raise UnsupportedModelError(
                f"model_type '{self.model_types[0]}': no routing rule of the generic adapter reproduces its router; "
                "drop-loss importance, skipping, pruning and merging recompute routing and need a family file."
            )
        return self._route(block, hidden, excluded, self.rule)

    def _route(self, block: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None, rule: tuple[str, bool]):
        """Top-k of a linear router: softmax or sigmoid scores (`rule`), selected with an `e_score_correction_bias`
        (the router's or the block's) and the config's group limit where there are, weighted by the uncorrected
        scores, renormalised or not (`rule`), times the config's `routed_scaling_factor`."""
        linear = self.router_linear(self.router_module(block))
        bias = getattr(linear, "bias", None)
        logits = F.linear(hidden.float(), linear.weight.float(), None if bias is None else bias.float())
        scoring, renormalise = rule
        scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
        correction = self._correction(block)
        choice = scores + correction[1].float() if correction else scores.clone()
        if excluded is not None:
            choice = choice.masked_fill(excluded.to(choice.device), float("-inf"))
        choice = _group_limit(choice, _first(self.config, GROUP_KEYS, 1), getattr(self.config, "topk_group", 1))
        k = min(self.top_k(block), int((choice > float("-inf")).sum(-1).min()))
        indices = torch.topk(choice, k, dim=-1)[1]
        weights = scores.gather(1, indices)
        if renormalise:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        scale = getattr(self.config, "routed_scaling_factor", None) or 1.0
        return (weights * scale).to(hidden.dtype), indices

    def _correction(self, block: nn.Module) -> tuple[nn.Module, torch.Tensor] | None:
        """(holder, `e_score_correction_bias`) of the router, else of the block, or None."""
        for holder in (self.router_module(block), block):
            if isinstance(getattr(holder, "e_score_correction_bias", None), torch.Tensor):
                return holder, holder.e_score_correction_bias
        return None

    def _watch(self, block: nn.Module, hidden: torch.Tensor) -> None:
        """Run the block on tokens `hidden` [T, H] up to its experts and recognize the routing they receive (a block
        that cannot run alone, as a decoder layer holding its experts, leaves the rule unknown)."""
        seen = []

        def grab(module, args, kwargs):
            seen.append((*args, *kwargs.values())[:3])
            raise _Seen

        handle = getattr(block, self.experts_name).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                block(hidden[None])
        except _Seen:
            x, indices, weights = seen[0]
            self.recognize_routing(block, x.reshape(-1, x.shape[-1]), weights, indices)
        except Exception:  # noqa: BLE001 - whatever stops the block alone, its routing stays unrecognized
            self.rule_checked = True
        finally:
            handle.remove()

    def router_vectors(self, block: nn.Module) -> list[tuple[nn.Module, str]]:
        correction = self._correction(block)
        return super().router_vectors(block) + ([(correction[0], "e_score_correction_bias")] if correction else [])

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return next((getattr(block, n) for n in SHARED_NAMES if hasattr(block, n)), None)

    # ---- config ------------------------------------------------------------------------------------------------------
    @property
    def num_experts_key(self) -> str:
        return next(k for k in NUM_EXPERTS_KEYS if isinstance(getattr(self.config, k, None), int))

    @property
    def expert_intermediate_key(self) -> str:
        return next(k for k in WIDTH_KEYS if isinstance(getattr(self.config, k, None), int))

    @property
    def is_multimodal(self) -> bool:
        from transformers import CONFIG_MAPPING

        return "vision_config" in (getattr(CONFIG_MAPPING[self.model_types[0]], "sub_configs", None) or {})

    def image_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        token = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
        return input_ids == token if token is not None else super().image_token_mask(model, input_ids)

    def auto_model_class(self):
        """The auto class whose mapping has the config: causal LM (a text model) else image-text-to-text."""
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForImageTextToText
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        text_only = CONFIG_MAPPING[self.model_types[0]] in MODEL_FOR_CAUSAL_LM_MAPPING and not self.is_multimodal
        return AutoModelForCausalLM if text_only else AutoModelForImageTextToText


def _is_experts(module: nn.Module) -> bool:
    """A transformers experts module, or one of ours standing in for it (packed, factored)."""
    return is_experts_class(type(module)) or hasattr(module, "expert_weights")


def _count(experts: nn.Module) -> int:
    """How many routed experts a (fused, packed or factored) experts module holds."""
    count = getattr(experts, "num_experts", None)
    return int(count) if isinstance(count, int) else int(experts.gate_up_proj.shape[0])


def _width(experts: nn.Module) -> int:
    """The hidden size the experts read and write (the model's, or a narrower MoE width of its own)."""
    size = getattr(experts, "hidden_size", None)
    if isinstance(size, int):
        return size
    down = experts.down_proj
    return int(down.shape[-1] if experts.is_transposed else down.shape[-2])


def _first(config, keys: tuple[str, ...], default=None):
    value = next((getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)), default)
    if value is None:
        raise UnsupportedModelError(f"the config names none of {list(keys)}; this adapter cannot read it.")
    return value


def _same_routing(w: torch.Tensor, i: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> bool:
    """The same experts for at least 99% of the tokens, and there the same weights (to 1e-3)."""
    if i.shape != indices.shape:
        return False
    order, theirs = i.sort(-1), indices.sort(-1)
    same = (order.values == theirs.values.to(i.device)).all(-1)
    if same.float().mean() < 0.99:
        return False
    mine = w.gather(1, order.indices)[same].float()
    other = weights.gather(1, theirs.indices.to(weights.device))[same].float().to(mine.device)
    return bool(torch.allclose(mine, other, rtol=1e-3, atol=1e-5))


def _group_limit(choice: torch.Tensor, groups: int, keep: int) -> torch.Tensor:
    """Selection scores outside the `keep` best of `groups` expert groups (a group scored by its best two) masked."""
    if groups <= 1:
        return choice
    grouped = choice.view(choice.shape[0], groups, -1)
    best = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].nan_to_num(neginf=-1e30).sum(-1)
    mask = torch.zeros_like(best).scatter_(1, best.topk(keep, dim=-1)[1], 1).bool()
    return grouped.masked_fill(~mask[..., None], float("-inf")).view_as(choice)


def _find_router(block: nn.Module, experts_name: str) -> tuple[str | None, str]:
    """(the block's child holding the router, the path inside it to the module with the [E, H] `weight`), or
    (None, '') where the block has no such matrix."""
    shape = (_count(getattr(block, experts_name)), _width(getattr(block, experts_name)))
    found = [
        name
        for name, module in block.named_modules()
        if name
        and name.split(".")[0] not in (experts_name, *SHARED_NAMES)
        and getattr(module._parameters.get("weight"), "shape", None) == shape
    ]
    found.sort(key=lambda name: not any(word in name for word in ("router", "gate")))  # a router's name first
    if not found:
        return None, ""
    child, _, inner = found[0].partition(".")
    return child, inner


def _require_gated(experts: nn.Module, model_type: str) -> None:
    if getattr(experts, "has_gate", True) is False or getattr(experts, "has_post_expert_norm", False):
        what = "no gate projection (act(up) only)" if not experts.has_gate else "a norm after each expert"
        raise UnsupportedModelError(
            f"model_type '{model_type}': its experts have {what}; moecompress's expert formats and kernels compute "
            "down(act(gate) * up), so this family needs a family file."
        )
