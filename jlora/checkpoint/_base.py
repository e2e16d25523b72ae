"""The base an adapter checkpoint was saved for: each weight's path, shape, dtype and content digest.

The fingerprint lists every leaf of at least one axis (the weights; scalars such as a step counter
are left out), so that adapters restored onto another model fail with the first differing path
rather than a shape error deep inside XLA. Shapes alone cannot tell two checkpoints of one
architecture apart (another fine-tune, another size's tokenizer resize aside), so ``save`` also
records a SHA-256 digest of each such leaf's bytes when the base holds concrete values this process
can read whole, and ``restore`` / ``merge_checkpoint`` compare them.

**Cost.** Hashing reads the whole base once, about a second per GB per core, at save and again
at restore (``merge_checkpoint`` hashes each leaf as it reads it anyway). Pass
``base_digest=False`` to skip it, e.g. for a base of hundreds of GB; the shape check stays.
Bases given as ``jax.ShapeDtypeStruct`` or sharded over several processes are checked by shape
only (their bytes are not all here).
"""

from __future__ import annotations

from typing import Any

from .. import _digest
from .._errors import AdapterMismatchError
from .._paths import leaves_with_paths

Fingerprint = list[tuple[str, tuple[int, ...], str]]


def dtype_name(dtype: Any) -> str:
    """A dtype as the string ``np.dtype`` reads back (``"bfloat16"`` included, via ml_dtypes)."""
    import numpy as np

    return np.dtype(dtype).name


def _weights(base: Any) -> list[tuple[str, Any]]:
    out = []
    for path, leaf in leaves_with_paths(base):
        shape = getattr(leaf, "shape", None)
        if shape is None or getattr(leaf, "dtype", None) is None or len(shape) == 0:
            continue
        out.append((path, leaf))
    return out


def fingerprint(base: Any) -> Fingerprint:
    """``[(path, shape, dtype), ...]`` of every leaf of ``base`` with at least one axis, in order.

    Leaves may be arrays, ``jax.ShapeDtypeStruct`` or orbax array metadata.
    """
    return [
        (path, tuple(int(n) for n in leaf.shape), dtype_name(leaf.dtype))
        for path, leaf in _weights(base)
    ]


def digests(base: Any) -> dict[str, str] | None:
    """``{path: SHA-256}`` of the leaves in the fingerprint, or None if any is not readable here."""
    weights = _weights(base)
    if not all(_digest.can_digest(leaf) for _, leaf in weights):
        return None
    return {path: _digest.array_digest(leaf) for path, leaf in weights}


def _describe(entry: tuple[tuple[int, ...], str] | None) -> str:
    return "no such leaf" if entry is None else f"shape {entry[0]} {entry[1]}"


def check_fingerprint(saved: Fingerprint, base: Any) -> None:
    """Raises :class:`AdapterMismatchError` at the first path where ``base`` differs from ``saved``."""
    found = {path: (shape, dtype) for path, shape, dtype in fingerprint(base)}
    expected = {path: (tuple(shape), dtype) for path, shape, dtype in saved}
    order = [p for p, _, _ in saved] + [p for p in found if p not in expected]
    differing = [p for p in order if found.get(p) != expected.get(p)]
    if differing:
        path = differing[0]
        raise AdapterMismatchError(
            f"{path}: the base given has {_describe(found.get(path))} but the adapters were saved "
            f"for a base with {_describe(expected.get(path))} ({len(differing)} differing paths). "
            "Were these adapters made for another model? Restore them with the base they were "
            "trained on, or without base= to skip this check"
        )


def content_mismatch(path: str, n_differing: int | None = None) -> AdapterMismatchError:
    """The error for a base leaf whose bytes differ from those the adapters were saved for."""
    count = "" if n_differing is None else f" ({n_differing} differing leaves)"
    return AdapterMismatchError(
        f"{path}: the base given has the same shape and dtype but other values than the base "
        f"the adapters were saved for (its content digest differs){count}. Were these adapters "
        "trained on another checkpoint of this model? Use the base they were trained on, or pass "
        "base_digest=False (on the command line: --no-base-digest) to check shapes only"
    )


def check_digests(saved: dict[str, str] | None, base: Any) -> None:
    """Raises :class:`AdapterMismatchError` at the first leaf whose content differs from ``saved``.

    Does nothing when nothing was saved or ``base`` is not readable here (abstract, or sharded
    over processes); call after :func:`check_fingerprint`.
    """
    if not saved:
        return
    weights = [(p, leaf) for p, leaf in _weights(base) if p in saved]
    if not all(_digest.can_digest(leaf) for _, leaf in weights):
        return
    differing = [p for p, leaf in weights if _digest.array_digest(leaf) != saved[p]]
    if differing:
        raise content_mismatch(differing[0], len(differing))
