"""Quantization of the linear layers outside the routed experts (`dense:`): attention, shared experts, dense MLPs and
the LM head, read at every decode step. GPTQ on each layer's input Hessian from one pass of the calibration data
through the model (its experts as the earlier stages left them), or round-to-nearest."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..formats import FORMATS, PackedTensor, QuantFormat, pack, unpack
from .gptq import quantize_gptq
from .rtn import quantize_rtn

DENSE_KINDS = ("attention", "shared", "mlp", "lm_head")
DENSE_METHODS = ("gptq", "rtn")


@dataclass
class DenseQuantConfig:
    """bits: 0 keeps these layers as they are; 8 or 4 (any width of the integer format) quantizes them, `group_size`
    weights per scale (-1: per output channel), `sym` on symmetric grids. targets: which of attention, shared
    (shared experts), mlp (the dense MLPs of non-MoE layers), lm_head (one tied to the input embeddings is untied:
    the embeddings stay, the head becomes a quantized copy). method: gptq or rtn. Embeddings stay in the checkpoint's
    dtype (`save_dtype`); routers are never quantized."""

    bits: int = 0
    group_size: int = 128
    sym: bool = False
    method: str = "gptq"
    targets: list[str] = field(default_factory=lambda: list(DENSE_KINDS))
    damp: float = 0.01

    @property
    def format(self) -> QuantFormat:
        return FORMATS["int"].for_bits(self.bits, self.group_size, self.sym)


def dense_targets(model: nn.Module, adapter, kinds: list[str]) -> dict[str, str]:
    """{module name: kind} of the `nn.Linear`s of `model` that `kinds` choose: inside the text decoder layers, outside
    the routed experts and routers, and the LM head."""
    prefix, views = adapter.layers_prefix(model), adapter.moe_blocks(model)
    skip = {id(m) for view in views for m in (*view.experts.modules(), *view.router.modules())}
    blocks = {id(view.block) for view in views}
    found = {}
    for index, layer in enumerate(adapter.decoder_layers(model)):
        inside_moe = {id(m) for b in layer.modules() if id(b) in blocks for m in b.modules()}
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear) or id(module) in skip:
                continue
            kind = "shared" if id(module) in inside_moe else "attention" if _is_attention(name) else "mlp"
            found[f"{prefix}.{index}.{name}"] = kind
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        found[next(n for n, m in model.named_modules() if m is head)] = "lm_head"
    return {name: kind for name, kind in found.items() if kind in kinds}


def _is_attention(name: str) -> bool:
    return any(part in name for part in ("attn", "attention", "mixer"))


def untie_lm_head(model: nn.Module) -> bool:
    """Whether the LM head shared its weight with the input embeddings; if so, no longer (its own quantized copy
    replaces it, the embeddings keep theirs), in the config that the checkpoint saves too."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def input_hessians(model: nn.Module, names: list[str], batches, device: str, progress=None) -> dict[str, torch.Tensor]:
    """{name: mean x x^T} of each linear's inputs over the calibration `batches` (one forward each). Linears fed the
    same tensor (q, k and v) share one product per forward."""
    sums = {name: None for name in names}
    counts = dict.fromkeys(names, 0)
    products: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this forward's, by input: (input, x^T x)

    def hook(name):
        def add(module, args):
            x = args[0]  # the caller's own tensor object: q, k and v are handed the same one
            if id(x) not in products or products[id(x)][0] is not x:
                flat = x.reshape(-1, module.in_features).float()
                products[id(x)] = (x, flat.T @ flat)
            h = products[id(x)][1]
            sums[name] = h.clone() if sums[name] is None else sums[name].add_(h)
            counts[name] += x.numel() // module.in_features

        return add

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                products.clear()
                model(**{k: v.to(device) for k, v in batch.inputs.items()}, use_cache=False)
                if progress is not None:
                    progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return {n: sums[n] / max(counts[n], 1) for n in names if sums[n] is not None}


def quantize_linear(weight: torch.Tensor, fmt: QuantFormat, hessian: torch.Tensor | None, damp: float) -> PackedTensor:
    """GPTQ of one [out, in] weight on its input Hessian (round-to-nearest without one), packed."""
    w = weight.detach().float().cpu()
    qt = quantize_rtn(w, fmt) if hessian is None else quantize_gptq(w, hessian.float().cpu(), fmt, damp)
    return pack(qt)


def relative_error(weight: torch.Tensor, packed: PackedTensor, hessian: torch.Tensor | None) -> float:
    """||(W - W_q) X|| / ||W X|| over the calibration inputs (their Hessian), or of the weights without one."""
    w = weight.detach().double().cpu()
    delta = unpack(packed).dequantize(torch.float64) - w
    if hessian is None:
        return float(delta.norm() / w.norm())
    h = hessian.double().cpu()
    return float(((delta @ h) * delta).sum().clamp_min(0).sqrt() / ((w @ h) * w).sum().sqrt())
