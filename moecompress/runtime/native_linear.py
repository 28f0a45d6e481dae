"""The unquantized linear layers of a loaded checkpoint (attention, LM head, dense MLPs) through the native dense
GEMV at decode. Once the experts are packed, these layers dominate a decode step: on this project's 2-core CPU torch
reads float32 weights at about 20 GB/s at batch 1 and 10 GB/s at 4-16 tokens, the native kernel at 35 GB/s, 80-90 %
of the machine's measured bandwidth (`python eval/bench_cpu_kernels.py --dense-only`). Float32 and bfloat16 weights
are read as they are (no copy), with float32 activations and sums: the result equals `F.linear`'s to float32
rounding.

Each `nn.Linear` (exactly that class) becomes a `NativeLinear`: same parameters, hooks and state-dict names, and
the torch forward wherever the kernel does not apply (GPU tensors, gradients, more than `NATIVE_TOKENS` tokens,
other dtypes, no native library)."""

from __future__ import annotations

import torch
from torch import nn

from . import native

# Tokens per call up to which the native kernel runs (decode and small batches; measured 1.15x torch's float32 speed
# at 16 tokens, 3x at 4): two passes over the weights at most. Prefill is a BLAS's work.
NATIVE_TOKENS = 16
_DTYPES = (torch.float32, torch.bfloat16)


class NativeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():  # a custom op in the graph
            from .decode import linear_op

            y = linear_op(self, x)
            return self._torch(x) if y is None else y
        w = self.weight
        if (
            x.device.type != "cpu"
            or w.device.type != "cpu"
            or w.dtype not in _DTYPES
            or not w.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or x.numel() > NATIVE_TOKENS * self.in_features
            or native.library() is None
        ):
            return self._torch(x)
        return native.dense_linear(w, self.bias, x)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        """torch's linear, the weight cast to the activations' dtype where they differ (bfloat16 weights kept for the
        kernel under float32 activations)."""
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return torch.nn.functional.linear(x, w, b)


def use_native_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `NativeLinear`; how many (0 where the native library is missing)."""
    if native.library() is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = NativeLinear
            count += 1
    return count


def dense_kernels(model: nn.Module) -> str:
    """What runs the model's unquantized linear layers on the CPU at decode."""
    lib = native.library()
    if lib is None or not any(isinstance(m, NativeLinear) for m in model.modules()):
        return "torch"
    isa = {4: "avx512", 3: "avx512", 2: "avx2"}.get(lib.moe_cpu_isa(), "portable")
    return f"native-{isa} dense GEMV (up to {NATIVE_TOKENS} tokens)"
