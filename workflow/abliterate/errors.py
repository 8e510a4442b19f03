"""Exceptions with actionable messages: each names what was wrong and which config key to change."""


class AbliterateError(Exception):
    """Base class for errors caused by bad input (config, data, model), not by bugs."""


class ConfigError(AbliterateError):
    """A configuration value is missing, of the wrong type or impossible."""


class ModelLoadError(AbliterateError):
    """The model (or tokenizer) cannot be found or loaded as configured."""


class UnsupportedArchitectureError(AbliterateError):
    """No decoder layers or editable components were found in the model."""


class PromptError(AbliterateError):
    """A prompt set is missing, empty, too small or overlaps another split."""


class UnsupportedVersionError(AbliterateError):
    """An installed library (transformers) is older than the oldest release abliterate supports."""


class QuantizationBackendError(AbliterateError):
    """Quantization was requested but no usable bitsandbytes backend is present."""


class NumericalError(AbliterateError):
    """A computed quantity is impossible (negative KL, NaN logits); it signals a bug, never clamp it."""


class DamagedFileError(AbliterateError):
    """An artifact on disk is truncated or corrupt; the message says which file and what to do."""


class StudyLostError(AbliterateError):
    """The study's database holds fewer completed trials than its ledger recorded (emptied, deleted,
    replaced or truncated): continuing would silently start over."""
