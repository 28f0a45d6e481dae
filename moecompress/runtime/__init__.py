from .packed_experts import PackedExpert, PackedExperts, PackedLinear

__all__ = ["PackedExpert", "PackedExperts", "PackedLinear"]
