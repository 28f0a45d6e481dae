"""The lowest layer: tensor files (safetensors headers, streaming reads, sharded writes), claimed and atomically
written outputs, and the layer store of a resumable streamed run. Models, calibration and io build on it."""
