"""Merging one base leaf read from disk, ``W0 + scale * a @ b``, bit-equal to :func:`jlora.merge`.

``jlora.merge`` forms the delta ``scale * a @ b`` in float32 (op by op), adds it to the float32
weight and rounds the sum once to the weight's dtype. Here all of it is one jitted program per
shape, dtype and scale: the delta from the very same code (:func:`jlora._merge.factor_delta`, whose
product and scaling XLA:CPU computes to the same bits inside a larger program as alone; tests
compare them), then the weight's conversion, the add and the rounding in one pass over the leaf;
new NaN/Inf are found afterwards by a NumPy scan of the output's bits, chunk by chunk. XLA:CPU's code generator contracts a multiply followed by an add into a
fused multiply-add, which would skip the float32 rounding of ``scale * (a @ b)`` that
``jlora.merge`` performs (why it runs op by op). The program stops that contraction with a fence:
the scaled delta's bits are OR-ed with a zero that is an argument of the program (so XLA cannot
fold it away), and an integer operation between the multiply and the add cannot be contracted. So
each element is ``dtype(f32(w) + f32(scale * f32(a @ b)))`` as in ``jlora.merge`` (tests compare
the bits), in one pass instead of merge's four.

The delta is formed whole: the rows of ``a[rows] @ b`` computed alone are *not* always the rows of
``a @ b`` in the last float32 bit on XLA:CPU (measured), so a row-blocked delta would break the
bit-equality with :func:`jlora.merge`. The merged leaf is returned as a NumPy array (a view of the
program's output, no copy): handing orbax a ``jax.Array`` instead would make it write the array's
sharding too, and then ``StandardCheckpointer().restore(out)`` warns that none was given.
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


def _fenced(d: jax.Array, zero: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(d, jnp.uint32) | zero  # no multiply-add across this
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@jax.jit
def _merged(w: jax.Array, factors: LoraFactors, zero: jax.Array) -> jax.Array:
    return (w.astype(jnp.float32) + _fenced(factor_delta(factors), zero)).astype(w.dtype)


# Per dtype: the unsigned type of its bits, and the bits of +inf (all exponent bits set).
_NONFINITE_BITS = {"float32": (np.uint32, 0x7F800000), "bfloat16": (np.uint16, 0x7F80),
                   "float16": (np.uint16, 0x7C00)}  # fmt: skip
_CHUNK = 2**22  # elements per step of the scan for NaN/Inf (a few MiB of temporaries)


def _any_nonfinite(x: np.ndarray) -> bool:
    # NaN/Inf have every exponent bit set: the largest magnitude bits are >= those of inf. A
    # NumPy scan of the bits, chunk by chunk, costs a fraction of XLA:CPU's reductions here.
    uint, inf = _NONFINITE_BITS[x.dtype.name]
    bits = x.reshape(-1).view(uint)
    magnitude = uint(np.iinfo(uint).max >> 1)  # every bit but the sign
    return any(
        int(np.max(bits[i : i + _CHUNK] & magnitude)) >= inf for i in range(0, bits.size, _CHUNK)
    )


def merge_leaf(path: str, w: np.ndarray, factors: LoraFactors, *, check_finite: bool) -> np.ndarray:
    """``w`` merged with ``factors``: an array of ``w``'s dtype with ``jlora.merge``'s bits.

    With ``check_finite``, raises :class:`NonFiniteError` (naming ``path``) when the merged leaf
    holds NaN or infinite values where ``w`` is finite.
    """
    check_fit(path, w, factors)
    out = np.asarray(_merged(w, factors, jnp.zeros((), jnp.uint32)))  # a view, no copy
    if check_finite and out.size and _any_nonfinite(out):
        check_merged(path, out, w)  # the exact count, only when there is something to count
    return out


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
