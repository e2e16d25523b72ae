"""The exceptions jlora raises.

Every message names the parameter path (when there is one), what was found, what was expected, and
how to fix it. Each class subclasses the built-in exception a caller would expect to catch, so
``except ValueError`` keeps working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A :class:`jlora.LoraConfig` field has an invalid value."""


class TargetError(ValueError):
    """The config's targets do not select valid weights of the given parameter tree."""


class AdapterMismatchError(ValueError):
    """Adapters do not fit the base parameters (made for another model, or a different config)."""


class NotAnArrayError(TypeError):
    """A targeted leaf of the parameter tree is not an array."""


class MissingRngError(ValueError):
    """LoRA dropout is on (rate > 0) but no PRNG key was given for it."""


class PeftFormatError(ValueError):
    """Adapters cannot be written in, or files cannot be read as, Hugging Face PEFT's LoRA format."""
