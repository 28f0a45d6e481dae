"""Typed errors. Every message names the problem and the fix."""


class MoECompressError(Exception):
    """Base class of every error moecompress raises on purpose."""


class ModelLoadError(MoECompressError):
    """A model path or hub id could not be loaded."""


class UnsupportedModelError(MoECompressError):
    """The model has no MoE layers, or its architecture has no adapter."""


class RecipeError(MoECompressError):
    """A recipe file or dict is malformed (unknown key, bad value)."""


class CalibrationDataError(MoECompressError):
    """Calibration or evaluation data is missing or malformed."""


class CheckpointError(MoECompressError):
    """A packed checkpoint is missing, corrupt, truncated or does not match its manifest."""


class BudgetError(MoECompressError):
    """A bit or size budget cannot be met."""


class HubError(MoECompressError):
    """Creating or uploading to a Hugging Face Hub repository failed."""


class OutputError(MoECompressError):
    """The output path would overwrite or delete data moecompress did not write, or another run holds it."""


class NonFiniteError(MoECompressError):
    """A weight, scale or evaluation result is NaN or infinite."""


class InsufficientMemoryError(MoECompressError):
    """A stage needs more memory than the machine has; raised before the model is loaded."""
