"""Expert merging (Sub-MoE) and expert pruning (NAEE): the math, separate from model plumbing."""
