"""Merging one base leaf read from disk, ``W0 + scale * a @ b``, bit-equal to :func:`jlora.merge`.

``jlora.merge`` forms the delta ``scale * a @ b`` in float32 (op by op), adds it to the float32
weight and rounds the sum once to the weight's dtype. Here the delta comes from the very same code
(:func:`jlora._merge.factor_delta`: the same program on the same shapes), and the rest (the
weight's conversion, the add, the rounding, and the finite check of the merged values) is one
jitted pass, compiled once per shape and dtype. That program cannot fuse the add into a
multiply-add, which is why ``jlora.merge`` runs op by op: the delta is an input, already rounded
to float32, so each element is ``dtype(f32(w) + d)`` exactly as ``jlora.merge`` computes it (tests
compare the bits). It replaces merge's separate full passes for the conversion, the add and the
cast. The merged leaf goes to orbax as a NumPy array, as before: handing orbax's partial save
``jax.Array`` leaves wrote faster but left asyncio objects on closed event loops (unraisable
exception warnings).

The delta is formed whole: the rows of ``a[rows] @ b`` computed alone are *not* always the rows of
``a @ b`` in the last float32 bit on XLA:CPU (measured), so a row-blocked delta would break the
bit-equality with :func:`jlora.merge`. The float32 work per leaf is one delta of the leaf's shape.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _digest
from .._errors import NonFiniteError
from .._factors import LoraFactors
from .._merge import check_fit, factor_delta

_DTYPES = ("float32", "bfloat16", "float16")


def supported(w: Any, factors: Any) -> bool:
    """Whether :func:`merge_leaf` merges ``w`` (float32, bfloat16 or float16) with ``factors``."""
    return isinstance(factors, LoraFactors) and np.asarray(w).dtype.name in _DTYPES


@jax.jit
def _round_sum(w: jax.Array, d: jax.Array) -> jax.Array:
    return (w.astype(jnp.float32) + d).astype(w.dtype)


@jax.jit
def _round_sum_checked(w: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = (w.astype(jnp.float32) + d).astype(w.dtype)
    return out, jnp.sum(~jnp.isfinite(out) & jnp.isfinite(w))  # NaN/Inf new in the merged leaf


def merge_leaf(
    path: str, w: np.ndarray, factors: LoraFactors, *, check_finite: bool
) -> np.ndarray:
    """``w`` merged with ``factors``, a host array of ``w``'s dtype with ``jlora.merge``'s bits.

    With ``check_finite``, raises :class:`NonFiniteError` (naming ``path``) when the merged leaf
    holds NaN or infinite values where ``w`` is finite.
    """
    check_fit(path, w, factors)
    d = factor_delta(factors)  # the same program on the same shapes as jlora.merge's
    if not check_finite:
        return np.asarray(_round_sum(w, d))
    out, bad = _round_sum_checked(w, d)
    if int(bad):
        raise_nonfinite(path, int(bad), out.dtype)
    return np.asarray(out)


def check_merged(path: str, merged: np.ndarray, base: Any) -> None:
    """Raises :class:`NonFiniteError` if ``merged`` holds NaN/Inf where ``base`` is finite."""
    bad = _digest.count_new_nonfinite(merged, base)
    if bad:
        raise_nonfinite(path, bad, merged.dtype)


def raise_nonfinite(path: str, bad: int, dtype: Any) -> None:
    """Raises the :class:`NonFiniteError` of ``bad`` new NaN/Inf values in the merged ``path``."""
    raise NonFiniteError(
        f"{path}: merging gives {bad} NaN or infinite values where the base weight is finite "
        f"(dtype {np.dtype(dtype)}: W0 + scale * a @ b overflows it, or the factors are huge); "
        "nothing was written. Check the adapters, or pass check_finite=False (--no-check-finite) "
        "to write them anyway"
    )
