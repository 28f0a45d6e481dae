"""Quantized linear layers outside the routed experts (attention, shared experts, dense MLPs, LM head): the recipe's
`dense:` section replaces each chosen `nn.Linear` with a `QuantizedLinear`, stored as compressed-tensors stores a
packed linear (`{name}.weight_packed|weight_scale|weight_zero_point`, no `weight`). At decode on the CPU the native
packed GEMV reads the codes (int8 activations where the CPU and format allow, as the experts); elsewhere the torch
reference path dequantizes and multiplies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import PackedTensor, QuantFormat
from . import native, packed_experts
from .native_linear import NATIVE_TOKENS
from .packed_experts import PackedLinear


class QuantizedLinear(PackedLinear):
    """A `PackedLinear` that stands for a model's own `nn.Linear` (same name, same bias)."""

    def __init__(self, out_features: int, in_features: int, fmt: QuantFormat, bias: bool = False):
        super().__init__(out_features, in_features, fmt, bias)
        self._described: tuple | None = None  # (pack epoch, descriptor, the tensors it points into, int8 fits)
        self.small_weight: torch.Tensor | None = None  # `prepare_compiled`
        from .decode import register

        self.registry_key = register(self)

    def prepare_compiled(self, small_bytes: int) -> None:
        """Before a compiled decode step: a float32 copy of the weight where it takes under `small_bytes` (there
        inductor's own fused GEMV is faster than a call to the native kernel costs); bigger weights run natively."""
        small = 4 * self.out_features * self.in_features < small_bytes
        self.small_weight = self.dequantize(torch.float32) if small else None

    def native_usable(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and self.fmt.kernels
            and not (torch.is_grad_enabled() and x.requires_grad)
            and x.numel() <= NATIVE_TOKENS * self.in_features
            and native.library() is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.native_usable(x):  # one custom op in the graph (runtime/decode.py)
            from .decode import quantized_linear_op

            if self.small_weight is not None:
                return F.linear(x, self.small_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            return quantized_linear_op(self, x)
        if self.native_usable(x):
            return self.native_forward(x)
        return super().forward(x)

    def descriptor(self) -> tuple:
        """(the kernels' `ProjDesc` of this weight, whether the CPU runs it with int8 activations), made once."""
        epoch = packed_experts._pack_epoch
        if self._described is None or self._described[0] != epoch:
            desc, keep = native.describe(self)
            self._described = (epoch, desc, keep, native.int8_fits(self))
        return self._described[1], self._described[3]

    def native_forward(self, x: torch.Tensor) -> torch.Tensor:
        desc, int8 = self.descriptor()
        y = native.packed_linear(self, x, int8 and x.numel() <= native.INT8_TOKENS * self.in_features, desc)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def load_packed(self, packed: PackedTensor) -> None:
        super().load_packed(packed)
        self.small_weight = None

    def _apply(self, fn, recurse=True):
        self._described = self.small_weight = None  # they point into or copy the buffers, which may move
        return super()._apply(fn, recurse)


def install_quantized_linear(
    model: nn.Module, name: str, fmt: QuantFormat, packed: PackedTensor | None = None, method: str = "gptq"
) -> None:
    """Replace the `nn.Linear` `name` of `model` with a `QuantizedLinear` holding `packed` (its bias kept); with
    `packed` None, an empty one on the meta device (the loader fills it from the checkpoint)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    has_bias = linear.bias is not None
    device = torch.device("meta") if packed is None else linear.weight.device
    with device:
        module = QuantizedLinear(linear.out_features, linear.in_features, fmt, has_bias)
    if packed is not None:
        module.load_packed(packed)
        if has_bias:
            module.bias.copy_(linear.bias.detach().float())
    module.method = method
    setattr(parent, child, module)
