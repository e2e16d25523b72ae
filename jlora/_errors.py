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


class DamagedCheckpointError(ValueError):
    """A checkpoint or file on disk is damaged: unreadable, truncated, or its data differs from
    the digests recorded when it was written."""


class NonFiniteError(ValueError):
    """Arrays jlora would load or write hold NaN or infinite values."""


class NotAnArrayError(TypeError):
    """A targeted leaf of the parameter tree is not an array."""


class MissingRngError(ValueError):
    """LoRA dropout is on (rate > 0) but no PRNG key was given for it."""


class PeftFormatError(ValueError):
    """Adapters cannot be written in, or files cannot be read as, Hugging Face PEFT's LoRA format."""


class SkippedTargetsWarning(UserWarning):
    """Targeted weights that could not be adapted were skipped (``LoraConfig(strict=False)`` or
    the ``"all-linear"`` preset); the message lists each path and why."""


class DegenerateBasisWarning(UserWarning):
    """A singular basis was asked for where some of the singular values are zero (e.g. the output
    side of an untrained adapter, whose ``b`` is 0): those directions are arbitrary, not learned."""


def skipped_message(skipped: dict[str, str]) -> str:
    """One warning's text for ``{path: reason}`` of skipped weights."""
    lines = [
        f"  {reason}" if reason.startswith(path) else f"  {path}: {reason}"
        for path, reason in skipped.items()
    ]
    return (
        f"jlora skipped {len(skipped)} targeted weight(s) it cannot adapt (strict=False or the "
        "'all-linear' preset); narrow the targets or add them to exclude to silence this:\n"
        + "\n".join(lines)
    )


class BankError(ValueError):
    """An adapter-bank operation is invalid: a slot or adapter id out of range, an id naming an
    empty slot, a full bank, or an adapter name used twice (see :mod:`jlora.serving`)."""
