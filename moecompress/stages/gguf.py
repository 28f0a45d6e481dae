"""The `gguf:` section of a recipe: the llama.cpp types of the tensors outside the routed experts when the checkpoint
is exported with `moecompress export CKPT --format gguf` (the experts keep the types the quantize stage gave them).
It changes nothing in the checkpoint: it is saved with the recipe, and the export reads it there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import RecipeError
from ..formats.ggml_blocks import TERNARY_TYPES
from ..io.gguf_export import check_type
from .base import Stage, register_stage

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class GGUFConfig:
    """default_type: of every 2-D tensor no pattern names (F16, BF16, F32, or a llama.cpp type such as Q6_K);
    tensor_types: {regex on the GGUF tensor name: type}, the first match wins, e.g. {"attn_v": Q6_K,
    "token_embd": Q6_K}. Norms and routers stay F32, as llama.cpp keeps them. ternary_type: what ternary experts
    become, TQ1_0 (1.69 bits per weight) or TQ2_0 (2.06, faster kernels)."""

    default_type: str = "F16"
    tensor_types: dict[str, str] = field(default_factory=dict)
    ternary_type: str = "TQ1_0"


@register_stage
class GGUFTypes(Stage):
    name = "gguf"
    order = 95
    section, config = "gguf", GGUFConfig

    def validate(self, recipe: Recipe) -> None:
        section = recipe.gguf
        for pattern, name in {"default_type": section.default_type, **section.tensor_types}.items():
            try:
                check_type(str(name), f"gguf.tensor_types['{pattern}']" if pattern != "default_type" else "gguf")
            except RecipeError as exc:
                recipe.fail(str(exc))
        if section.ternary_type not in TERNARY_TYPES:
            recipe.fail(f"gguf.ternary_type '{section.ternary_type}': use one of {list(TERNARY_TYPES)}")
