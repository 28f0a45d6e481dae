from .allocate import AllocationConfig, allocate
from .plan import CompressionPlan
from .solver import solve_allocation

__all__ = ["AllocationConfig", "CompressionPlan", "allocate", "solve_allocation"]
