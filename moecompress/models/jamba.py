from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class JambaAdapter(ModelAdapter):
    """Jamba: softmax top-k routing without renormalisation; MoE blocks in `feed_forward` of every
    `expert_layer_period`-th layer; Mamba and attention layers interleaved."""

    model_types = ("jamba",)
    block_name = "feed_forward"
    router_name = "router"
    expert_intermediate_key = "intermediate_size"
