"""The dense product ``scale * (drop(x) a) b``: on 2-D views, ``a`` rank-leading behind a barrier.

The derivation of the backward pass, and why ``a`` enters transposed, is in :mod:`jlora.ops`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from .. import _explicit
from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from ._dropout import dropout
from ._operands import LORA_INPUT, _check_floating, _one_layer


def dense_branch(
    x: jax.Array, factors: LoraFactors, *, dropout_rate: float = 0.0, rng: jax.Array | None = None
) -> jax.Array:
    """The LoRA term of a Dense/DenseGeneral/Einsum layer: ``scale * (drop(x) a) b``.

    Args:
        x: ``(..., *fan_in)``, the layer input with its contracted axes last.
        factors: one layer's factors, ``a: (*fan_in, r)``, ``b: (r, *fan_out)``.
        dropout_rate: LoRA dropout on ``x``.
        rng: PRNG key for dropout.

    Returns:
        ``(..., *fan_out)`` in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = jlora.LoraFactors(jnp.ones((3, 2)), jnp.ones((2, 4)), 0.5, jlora.Layout(1, 1))
        >>> dense_branch(jnp.ones((5, 3)), f).shape
        (5, 4)
    """
    a, b = _one_layer(factors, "dense_branch")
    _check_floating(x, "dense_branch")
    n_in = factors.layout.fan_in_ndim
    if x.shape[x.ndim - n_in :] != a.shape[:-1]:
        raise AdapterMismatchError(
            f"dense_branch: input's last {n_in} axes {x.shape[x.ndim - n_in :]} do not match the "
            f"adapter's fan-in {a.shape[:-1]}; were these factors made for another layer?"
        )
    x = dropout(x, dropout_rate, rng)
    if any(_explicit.entries(v) is not None for v in (x, a, b)):
        return _factored_explicit(checkpoint_name(x, LORA_INPUT), a, b, factors.scale)
    lead, fan_out = x.shape[: x.ndim - n_in], b.shape[1:]
    # Named after the reshape, so the name marks exactly the array the backward pass keeps.
    rows = checkpoint_name(x.reshape(math.prod(lead), math.prod(a.shape[:-1])), LORA_INPUT)
    a2 = a.reshape(rows.shape[1], a.shape[-1])
    b2 = b.reshape(b.shape[0], math.prod(fan_out))
    return _factored(rows, a2, b2, factors.scale).reshape(*lead, *fan_out)


def _factored(rows: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * (rows a) b`` for 2-D ``rows: (n, fan_in)``, ``a: (fan_in, r)``, ``b: (r, fan_out)``.

    ``scale * a`` enters as its transpose ``(r, fan_in)`` behind an optimisation barrier. Autodiff
    then forms the gradient of ``a`` as ``g_r^T rows`` of shape ``(r, fan_in)`` (rank axis leading)
    and transposes only that small result; without the barrier XLA folds the transpose into the
    product and computes it ``(fan_in, r)``-major, several times slower on CPU. The scale rides on
    that transpose, which is materialised anyway.

    Below float32 (bfloat16, float16) both products accumulate in and hand on float32: ``rows a``
    is not rounded to the narrow dtype, and the result is rounded once, at the end. XLA:CPU computes
    a narrow dot in float32 anyway, between converts; asking for the float32 result drops the
    converts of the rank-``r`` intermediate and of the output (``benchmarks/results/bf16-cpu.md``).
    float32 and float64 programs are unchanged.
    """
    scaled_a = a.astype(rows.dtype) * jnp.asarray(scale, rows.dtype)
    a_t = jax.lax.optimization_barrier(scaled_a.T)
    acc = rows.dtype if jnp.finfo(rows.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    xa = jax.lax.dot_general(rows, a_t, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    return jnp.matmul(xa, b.astype(acc)).astype(rows.dtype)


def _factored_explicit(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * (x a) b`` under explicit sharding: no 2-D views, each product's sharding named.

    Flattening split axes is a reshape jax refuses to lay out by itself, so the products contract
    the fan-in axes in place; ``a`` enters rank-leading behind the barrier, as in
    :func:`_factored`.
    """
    n_in, lead = a.ndim - 1, x.ndim - (a.ndim - 1)
    scaled_a = a.astype(x.dtype) * jnp.asarray(scale, x.dtype)
    a_t = jax.lax.optimization_barrier(jnp.moveaxis(scaled_a, -1, 0))
    dims = ((tuple(range(lead, x.ndim)), tuple(range(1, n_in + 1))), ((), ()))
    xa = jax.lax.dot_general(x, a_t, dims, out_sharding=_explicit.dot_sharding(x, a_t, dims))
    b = b.astype(x.dtype)
    dims = (((lead,), (0,)), ((), ()))
    return jax.lax.dot_general(xa, b, dims, out_sharding=_explicit.dot_sharding(xa, b, dims))
