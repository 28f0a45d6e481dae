"""Expert slimming (SlimMoE-style): prune intermediate neurons inside every routed expert, in stages,
with distillation from the original model after each stage."""
