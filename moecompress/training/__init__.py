from .distill import DistillConfig, DistillReport, distill

__all__ = ["DistillConfig", "DistillReport", "distill"]
