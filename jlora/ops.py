"""Factored LoRA products: the adapter's term of a layer's output, never forming ``W0 + delta``.

Each function returns only the LoRA term; the caller adds the frozen layer's own output:

    dense:   h = x W0 + scale * (drop(x) a) b
    conv:    h = conv(x, W0) + scale * conv(drop(x), a) b
    lookup:  h = W0[ids] + scale * a[ids] b
    attend:  h = x W0^T + scale * (x b^T) a^T          (a tied embedding used as output head)

Contracting through the rank ``r`` costs ``O(r (fan_in + fan_out))`` per row instead of the
``O(fan_in * fan_out)`` of building the dense update. LoRA dropout (Hu et al. 2022) acts on the
adapter's input only; the base path sees ``x`` untouched. Factors are cast to the input's dtype, so
bfloat16 activations run bfloat16 matmuls against float32 factors (the dense product accumulates
in float32 and rounds its result once).

The factors must be one layer's (no stack axes): inside ``nn.scan`` each step sees its own slice.

**The dense product runs on 2-D views** (all leading axes of ``x`` flattened into one row axis,
multi-axis fan-in/fan-out flattened too), so every product is a plain matrix product. Its backward
pass (autodiff) saves only the adapter's input and the rank-``r`` intermediate, and computes

    g_r = s (g b^T),   grad a = (g_r^T x)^T,   grad b = (s x a)^T g,   grad x = g_r a^T

with the gradient of ``a`` formed rank-axis-leading, ``(r, fan_in)``, and transposed only at that
small end: ``a`` enters the forward product as its transpose behind an optimisation barrier, which
keeps XLA from folding the transpose back into the ``(fan_in, r)``-major product that XLA:CPU runs
several times slower. The values equal plain autodiff of ``(x a) b`` to round-off
(``tests/test_ops_fast.py``).

**Saved inputs and recomputation.** A LoRA step must keep each adapter's input for the gradient of
``a``: the one activation a frozen model's backward pass would not keep. The dense, conv and
attend branches tag that input (after dropout) ``jax.ad_checkpoint.checkpoint_name(x, "lora_input")``
(``LORA_INPUT``), for remat policies that select by name (``save_only_these_names``, the offloading
policies). A policy cannot drop it by name alone: the array before the tag (a LayerNorm's or GELU's
output) is the same value and stays saveable. To trade time for memory, recompute whole blocks
instead: the blocks under ``nn.scan`` / ``nnx.scan``, each under ``nn.remat`` / ``nnx.remat`` with
``jlora.remat_policy()``, which keeps the base's projections and the rank-``r`` ``x a`` and
recomputes the adapters' inputs with the rest of the block (a Python loop of rematted blocks does
not lower the peak on XLA:CPU, which drops the barriers that order the recomputation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from . import _checks, _explicit, _mask
from ._errors import AdapterMismatchError, MissingRngError
from ._factors import LoraFactors

__all__ = [
    "LORA_INPUT",
    "attend_branch",
    "conv_branch",
    "dense_branch",
    "dropout",
    "lookup_branch",
]

LORA_INPUT = "lora_input"  # the checkpoint_name of every adapter input (see the module docstring)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout: zeros each entry with probability ``rate``, scales the rest by ``1/(1-rate)``.

    Each entry is an independent Bernoulli draw from 16 random bits (four entries per Threefry
    hash), so it is kept with probability ``1 - rate`` rounded to a multiple of ``2**-16``
    (``58982/65536`` for 0.1; exact for 0.5), and a kept entry is exactly ``x * (1 / (1 - rate))``
    with the factor rounded to ``x``'s dtype. The mask is a function of ``rng`` and ``x``'s shape
    only: the same on every backend and in the backward pass, and it is never drawn twice.

    Args:
        x: the adapter's input.
        rate: drop probability in ``[0, 1)``; 0 returns ``x`` itself.
        rng: a PRNG key, required when ``rate > 0``.

    Raises:
        MissingRngError: ``rate > 0`` and ``rng`` is None.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> y = dropout(jnp.ones(1000), 0.5, jax.random.key(0))
        >>> sorted(set(y.tolist()))
        [0.0, 2.0]
    """
    if not isinstance(rate, jax.core.Tracer) and not _is_rate(rate):
        raise ValueError(
            f"LoRA dropout rate {rate!r} is invalid; expected a number in [0, 1) (0 turns "
            "dropout off)"
        )
    if rate == 0.0:
        return x
    if rng is None:
        raise MissingRngError(
            f"LoRA dropout rate is {rate} but no PRNG key was given; pass rng= (in Flax: a "
            "'dropout' rng stream) for training, or dropout=0 / deterministic mode for evaluation"
        )
    _checks.prng_key(rng, "rng")
    keep = _mask.keep_mask(rng, rate, x.shape)
    # XLA turns a division by a constant into this product anyway; written out, it is exactly
    # x * fl(1 / (1 - rate)) in x's dtype on every backend.
    scale = jnp.asarray(1.0 / (1.0 - rate), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def _is_rate(rate: object) -> bool:
    if isinstance(rate, bool | np.bool_ | str | bytes) or np.ndim(rate) != 0:
        return False
    try:
        return np.isrealobj(rate) and 0.0 <= float(rate) < 1.0
    except (TypeError, ValueError):
        return False


def _check_floating(x: jax.Array, op: str) -> None:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{op}: the input is {_checks.found(x)}; expected an array")
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(
            f"{op}: the input has dtype {x.dtype}; the factors are cast to the input's dtype, so "
            "an integer input would truncate them and drop the LoRA term. Cast the input to the "
            "layer's floating dtype first (as the layer itself does)"
        )


def _one_layer(factors: LoraFactors, op: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(factors, LoraFactors):
        raise TypeError(
            f"{op}: factors is {_checks.found(factors)}; expected one layer's jlora.LoraFactors "
            "(an entry of the tree jlora.init returns)"
        )
    fan_in_ndim = factors.layout.fan_in_ndim
    if factors.a.ndim != fan_in_ndim + 1:
        raise AdapterMismatchError(
            f"{op}: factors a {factors.a.shape} have {factors.a.ndim - fan_in_ndim - 1} stack axes; "
            "a factored product takes one layer's factors. Slice the stack (nn.scan does this when "
            "the adapters travel in a scanned collection)"
        )
    if factors.b.ndim < 1 or factors.a.shape[-1] != factors.b.shape[0]:
        raise AdapterMismatchError(
            f"{op}: factors a {factors.a.shape} and b {factors.b.shape} disagree on the rank "
            "(a's last axis, b's first); expected a (*fan_in, r) and b (r, *fan_out), as "
            "jlora.init makes them"
        )
    return factors.a, factors.b


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


def conv_branch(
    x: jax.Array,
    factors: LoraFactors,
    *,
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    input_dilation: Sequence[int] | None = None,
    kernel_dilation: Sequence[int] | None = None,
    dropout_rate: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """The LoRA term of a convolution: ``scale * conv(drop(x), a) b``.

    ``a`` is a conv kernel ``(*window, c_in, r)`` run with the base conv's geometry, and ``b``
    ``(r, c_out)`` mixes its ``r`` channels, so the pair is the rank-``r`` kernel
    ``a @ b`` without building it.

    Args:
        x: ``(*batch, *spatial, c_in)`` (channels last, as Flax's ``nn.Conv``).
        factors: ``a: (*window, c_in, r)``, ``b: (r, c_out)``.
        strides, padding, input_dilation, kernel_dilation: as ``jax.lax.conv_general_dilated``
            (``padding`` a string or explicit ``(low, high)`` pairs), matching the base conv.
        dropout_rate: LoRA dropout on ``x``.
        rng: PRNG key for dropout.

    Returns:
        ``(*batch, *spatial_out, c_out)`` in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = jlora.LoraFactors(jnp.ones((3, 3, 2, 1)), jnp.ones((1, 5)), 1.0, jlora.Layout(3, 1))
        >>> conv_branch(jnp.ones((4, 8, 8, 2)), f, padding="VALID").shape
        (4, 6, 6, 5)
    """
    a, b = _one_layer(factors, "conv_branch")
    _check_floating(x, "conv_branch")
    n_spatial = a.ndim - 2
    batch = x.shape[: x.ndim - n_spatial - 1]
    x = checkpoint_name(dropout(x, dropout_rate, rng), LORA_INPUT)
    lhs = x.reshape(-1, *x.shape[len(batch) :])
    dims = jax.lax.conv_dimension_numbers(lhs.shape, a.shape, _channels_last(n_spatial))
    y = jax.lax.conv_general_dilated(
        lhs,
        a.astype(x.dtype),
        window_strides=tuple(strides) if strides is not None else (1,) * n_spatial,
        padding=padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        lhs_dilation=input_dilation,
        rhs_dilation=kernel_dilation,
        dimension_numbers=dims,
        out_sharding=_explicit.rows_sharding(lhs, a),
    )
    y, b = y * factors.scale, b.astype(x.dtype)
    out = jnp.tensordot(
        y, b, axes=1, out_sharding=_explicit.dot_sharding(y, b, _explicit.matmul_dims(y.ndim))
    )
    return out.reshape(*batch, *out.shape[1:])


def _channels_last(n_spatial: int) -> tuple[str, str, str]:
    if not 1 <= n_spatial <= 3:
        raise AdapterMismatchError(f"conv_branch: {n_spatial} spatial axes; expected 1 to 3")
    spatial = "HWD"[:n_spatial]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"


def lookup_branch(ids: jax.Array, factors: LoraFactors) -> jax.Array:
    """The LoRA term of an embedding lookup: ``scale * a[ids] b``.

    Args:
        ids: integer token ids of any shape.
        factors: ``a: (vocab, r)``, ``b: (r, features)``.

    Returns:
        ``(*ids.shape, features)`` in the factors' dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = jlora.LoraFactors(jnp.ones((10, 2)), jnp.ones((2, 3)), 1.0, jlora.Layout(1, 1, True))
        >>> lookup_branch(jnp.array([[1, 2]]), f).tolist()
        [[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]]
    """
    a, b = _one_layer(factors, "lookup_branch")
    if not jnp.issubdtype(getattr(ids, "dtype", None) or np.float64, jnp.integer):
        raise TypeError(
            f"lookup_branch: ids is {_checks.found(ids)} with dtype {getattr(ids, 'dtype', None)}; "
            "expected integer token ids (an int32 array)"
        )
    a_entries, ids_entries = _explicit.entries(a), _explicit.entries(ids)
    if a_entries is None and ids_entries is None:
        rows = jnp.take(a, ids, axis=0)
    else:
        # Explicit sharding: jax cannot infer a gather's output sharding when the table or the ids
        # are split, so name it: rows follow the ids (gathering at most a rank-r table).
        spec = (*(ids_entries or (None,) * ids.ndim), None)
        out = _explicit.sharding(a if a_entries is not None else ids, spec)
        rows = a.at[ids].get(mode="fill", out_sharding=out)  # jnp.take's mode
    rows = rows * factors.scale
    return jnp.matmul(
        rows, b, out_sharding=_explicit.dot_sharding(rows, b, _explicit.matmul_dims(rows.ndim))
    )


def attend_branch(x: jax.Array, factors: LoraFactors) -> jax.Array:
    """The LoRA term of a tied embedding used as output head: ``scale * (x b^T) a^T``.

    Args:
        x: ``(..., features)``.
        factors: ``a: (vocab, r)``, ``b: (r, features)``.

    Returns:
        ``(..., vocab)`` logits' LoRA term in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = jlora.LoraFactors(jnp.ones((10, 2)), jnp.ones((2, 3)), 1.0, jlora.Layout(1, 1, True))
        >>> attend_branch(jnp.ones((4, 3)), f).shape
        (4, 10)
    """
    a, b = _one_layer(factors, "attend_branch")
    _check_floating(x, "attend_branch")
    if x.shape[-1:] != b.shape[-1:]:
        raise AdapterMismatchError(
            f"attend_branch: the query's last axis {x.shape[-1:]} does not match the embedding's "
            f"features {b.shape[-1:]}; were these factors made for another layer?"
        )
    x = checkpoint_name(x, LORA_INPUT)
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    xb = jnp.tensordot(x, b, axes=dims[0], out_sharding=_explicit.dot_sharding(x, b, dims))
    xb = xb * factors.scale
    return jnp.tensordot(xb, a, axes=dims[0], out_sharding=_explicit.dot_sharding(xb, a, dims))
