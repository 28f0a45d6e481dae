from .mixtral import MixtralAdapter
from .registry import register_adapter


@register_adapter
class MiniMaxAdapter(MixtralAdapter):
    """MiniMax-Text-01 (minimax): Mixtral's renormalised softmax routing; lightning (linear) and full attention."""

    model_types = ("minimax",)
