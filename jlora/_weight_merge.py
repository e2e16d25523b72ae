"""The merge of one weight (the rule is stated in :mod:`jlora._merge`): the float32 delta
``scale * a @ b`` in the weight's own axis order, the check that the factors fit the weight,
``W0 +/- delta`` rounded once to the base dtype on the base weight's sharding, a trainable extra's
replacement value, and the NaN/Inf check of ``merge(..., check_finite=True)``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _explicit
from ._errors import AdapterMismatchError, NonFiniteError
from ._extras import Trainable, check_extra_fit
from ._factors import LoraFactors


def factor_delta(factors: LoraFactors) -> jax.Array:
    """``scale * a @ b`` in float32, shaped like the weight (axes in the weight's own order)."""
    a = factors.a.astype(jnp.float32)
    b = factors.b.astype(jnp.float32)
    rank = a.shape[-1]
    fan_in = a.shape[a.ndim - 1 - factors.layout.fan_in_ndim : -1]
    stack = a.shape[: a.ndim - 1 - factors.layout.fan_in_ndim]
    fan_out = b.shape[len(stack) + 1 :]
    a2 = a.reshape(*stack, -1, rank)
    b2 = b.reshape(*stack, rank, -1)
    n = len(stack)
    dims = (((n + 1,), (n,)), (tuple(range(n)), tuple(range(n))))
    d = jnp.matmul(
        a2,
        b2,
        precision=jax.lax.Precision.HIGHEST,
        out_sharding=_explicit.dot_sharding(a2, b2, dims),
    )
    d = (factors.scale * d).reshape(*stack, *fan_in, *fan_out)
    if factors.layout.order:
        d = jnp.transpose(d, factors.layout.from_factor_order(d.ndim))
    return d


def check_fit(path: str, weight: Any, factors: LoraFactors) -> None:
    """Raises :class:`AdapterMismatchError` if ``factors`` cannot adapt ``weight`` (trace time)."""
    shape = tuple(weight.shape)
    if not jnp.issubdtype(weight.dtype, jnp.floating):
        raise AdapterMismatchError(
            f"{path}: the weight has dtype {jnp.dtype(weight.dtype).name}, not floating point; "
            "merging the float delta into it would truncate it (usually to nothing). LoRA "
            "adapts floating-point weights; were these adapters made for another model?"
        )
    layout = factors.layout
    rank = factors.rank
    expected = layout.factor_shapes(shape, rank) if layout.fits(len(shape)) else None
    found = (tuple(factors.a.shape), tuple(factors.b.shape))
    if expected != found:
        raise AdapterMismatchError(
            f"{path}: adapter factors a {found[0]}, b {found[1]} do not fit the weight of shape "
            f"{shape}; expected a {expected[0] if expected else '?'}, b "
            f"{expected[1] if expected else '?'} for layout {layout}. Were these adapters made for "
            "another model? Create them with jlora.init on this model's params"
        )


def _combine(w: Any, factors: LoraFactors, subtract: bool) -> jax.Array:
    # Op by op, not one jitted expression: XLA would fuse `w + scale * a @ b` into fused
    # multiply-adds and skip the rounding of the float32 delta that the merge rule promises.
    try:
        w32 = jnp.asarray(w).astype(jnp.float32)
        d = factor_delta(factors)
        out = w32 - d if subtract else w32 + d
    except ValueError as e:
        if "incompatible devices" not in str(e):
            raise
        raise AdapterMismatchError(
            f"the weight is on devices {_devices(w)} but its adapter's factors are on "
            f"{_devices(factors.a)} (a) and {_devices(factors.b)} (b); put them on one mesh (restore or device_put the adapters "
            "onto jlora.sharding.factor_shardings of the weights' shardings)"
        ) from None
    return _on_sharding_of(out.astype(w.dtype), w)


def _devices(x: Any) -> list[int]:
    return sorted(d.id for d in getattr(getattr(x, "sharding", None), "device_set", ()))


def _on_sharding_of(out: Any, w: Any) -> Any:
    # A merged weight keeps its base weight's sharding. Under a trace (jit with the params closed
    # over, grad without jit, vmap over adapters) the result is a tracer even when `w` is concrete:
    # its sharding is the compiler's to choose, and asking a tracer for it raises.
    concrete = not isinstance(w, jax.core.Tracer) and not isinstance(out, jax.core.Tracer)
    if concrete and isinstance(w, jax.Array) and getattr(out, "sharding", None) != w.sharding:
        out = jax.device_put(out, w.sharding)
    return out


def replace_extra(path: str, w: Any, extra: Trainable) -> Any:
    """``extra.value`` checked against ``w`` and placed on ``w``'s sharding (the merge of an extra)."""
    check_extra_fit(path, w, extra)
    return _on_sharding_of(extra.value, w)


def _check_finite(path: str, merged: Any, w: Any) -> None:
    if isinstance(merged, jax.core.Tracer):
        raise TypeError(
            f"{path}: merge(..., check_finite=True) reads the merged values, which a trace (jit, "
            "grad, vmap) does not have; call merge outside the trace, or drop check_finite"
        )
    bad = int(jnp.sum(~jnp.isfinite(merged) & jnp.isfinite(jnp.asarray(w))))
    if bad:
        raise NonFiniteError(
            f"{path}: the merged weight holds {bad} NaN or infinite values where the base is "
            f"finite (dtype {jnp.dtype(merged.dtype).name}: W0 + scale * a @ b overflows it, or "
            "the factors hold NaN/Inf). Check the adapters before using this model"
        )
