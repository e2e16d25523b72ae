"""`quantized_matmul`: ``x @ dequantize(q)`` that never holds the whole float weight.

For a frozen ``W = dequantize(q)`` the only gradient of ``y = x W`` is the input's, ``dx = g W^T``,
which needs ``W`` again. Plain autodiff saves ``W`` from the forward pass, and XLA computes every
layer's ``W`` up front (it depends on parameters only), so a step holds a float copy of the
whole base: the memory QLoRA exists to save. Recomputing it (``jax.checkpoint``, or a custom VJP
whose backward pass dequantises again) is not enough on XLA:CPU, which drops optimisation
barriers early and merges the two identical dequantisations back into one.

So the product is a ``jax.custom_vjp`` that dequantises a block of rows at a time inside a loop:

    y = sum_k x[..., rows_k] W[rows_k, :]            dx[..., rows_k] = g W[rows_k, :]^T

The loops index the codes by the iteration counter, so no compiler pass can hoist or merge the
dequantisation: at any moment one block of rows (at most an eighth of the weight, at least 64
rows) is float. The residuals are the stored codes and scales (inputs, so free). Each block is
dequantised exactly as :func:`jlora.quant.dequantize` does (``code * absmax`` in float32, then
the weight's dtype, then the computation dtype); the sum over blocks is accumulated in float32.
``q`` receives a zero cotangent: the base is frozen.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _codes
from ._weight import QuantizedWeight, absmax_of

MIN_ROWS = 64  # below this a block's matmul is too thin to be worth a loop iteration


def block_rows(fan_in: int) -> int:
    """Rows per block: the largest divisor of ``fan_in`` at most ``max(64, fan_in // 8)``."""
    limit = max(MIN_ROWS, fan_in // 8)
    if fan_in <= limit:
        return fan_in
    return max(d for d in range(1, limit + 1) if fan_in % d == 0)


def fits(q: Any, n_in: int) -> bool:
    """Whether ``q`` is a weight whose first ``n_in`` axes are its fan-in (a matrix view)."""
    if not isinstance(q, QuantizedWeight) or not 0 < n_in < q.ndim:
        return False
    return q.kind != "int8" or q.reduced_axes == tuple(range(n_in))


def _matrix(q: QuantizedWeight, n_in: int) -> tuple[jax.Array, jax.Array]:
    """``(codes, scales)`` of the ``(fan_in, fan_out)`` view; scales are float32."""
    rows = math.prod(q.shape[:n_in])
    if q.kind == "int8":
        return q.codes.reshape(rows, -1), q.scales.reshape(1, -1)
    # Blocks and packed pairs run along the last axis, so merging leading or trailing axes
    # keeps them whole.
    return q.codes.reshape(rows, -1), absmax_of(q).reshape(rows, -1)


def _rows(q, codes, scales, start, size, dtype) -> jax.Array:
    c = jax.lax.dynamic_slice_in_dim(codes, start, size, 0)
    if q.kind == "int8":
        w = _codes.int8_dequantize(c, scales)
    else:
        s = jax.lax.dynamic_slice_in_dim(scales, start, size, 0)
        w = _codes.decode(c, s, q.kind, q.block_size)
    return w.astype(q.dtype).astype(dtype)


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def quantized_matmul(
    x: jax.Array, q: QuantizedWeight, *, n_in: int = 1, precision: Any = None
) -> jax.Array:
    """``x @ dequantize(q)``, contracting ``x``'s last ``n_in`` axes with ``q``'s first ``n_in``.

    The weight is dequantised a block of rows at a time, in ``x``'s dtype, in the forward and
    the backward pass alike; no float copy of the whole weight exists (see the module
    docstring). Differentiable for ``x``; ``q`` gets a zero cotangent.

    Args:
        x: the input ``(..., *q.shape[:n_in])``, a float dtype (the computation's).
        q: the quantised weight ``(*fan_in, *fan_out)``; for int8, absmax over the fan-in axes.
        n_in: how many leading axes of ``q`` are fan-in.
        precision: as for ``jax.lax.dot_general``.

    Returns:
        ``(..., *q.shape[n_in:])`` in ``x``'s dtype.

    Example:
        >>> import jax, jax.numpy as jnp, jlora.quant
        >>> q = jlora.quant.quantize({"w": jnp.ones((256, 64))}, "w")["w"]
        >>> x = jnp.ones((2, 256))
        >>> y = jlora.quant.quantized_matmul(x, q)
        >>> bool(jnp.allclose(y, x @ jlora.quant.dequantize(q)))
        True
        >>> jax.grad(lambda x: jlora.quant.quantized_matmul(x, q).sum())(x).shape
        (2, 256)
    """
    if not fits(q, n_in):
        raise TypeError(
            f"quantized_matmul: q must be a QuantizedWeight whose first n_in={n_in} axes are its "
            f"fan-in; got {type(q).__name__} of shape {getattr(q, 'shape', None)}"
        )
    fan_in, fan_out = q.shape[:n_in], q.shape[n_in:]
    if tuple(x.shape[x.ndim - n_in :]) != fan_in:
        raise TypeError(
            f"quantized_matmul: x of shape {x.shape} does not end in the weight's fan-in axes "
            f"{fan_in} (weight {q.shape})"
        )
    lead, k, n = x.shape[: x.ndim - n_in], math.prod(fan_in), math.prod(fan_out)
    rows = block_rows(k)
    steps, dtype = k // rows, x.dtype
    acc = jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype

    def forward_loop(x2, q):
        codes, scales = _matrix(q, n_in)

        def body(i, y):
            start = i * rows
            xs = jax.lax.dynamic_slice_in_dim(x2, start, rows, x2.ndim - 1)
            w = _rows(q, codes, scales, start, rows, dtype)
            dims = (((xs.ndim - 1,), (0,)), ((), ()))
            return y + jax.lax.dot_general(
                xs, w, dims, precision=precision, preferred_element_type=acc
            )

        y = jnp.zeros((*lead, n), acc)
        return jax.lax.fori_loop(0, steps, body, y).astype(dtype)

    @jax.custom_vjp
    def product(x2, q):
        return forward_loop(x2, q)

    def forward(x2, q):
        return forward_loop(x2, q), q

    def backward(q, g):
        codes, scales = _matrix(q, n_in)

        def body(i, dx):
            start = i * rows
            w = _rows(q, codes, scales, start, rows, dtype)
            dims = (((g.ndim - 1,), (1,)), ((), ()))
            part = jax.lax.dot_general(g, w, dims, precision=precision)
            return jax.lax.dynamic_update_slice_in_dim(dx, part.astype(dtype), start, dx.ndim - 1)

        dx = jax.lax.fori_loop(0, steps, body, jnp.zeros((*lead, k), dtype))
        return dx, jax.tree.map(_zero_cotangent, q)

    product.defvjp(forward, backward)
    y = product(x.reshape(*lead, k), q)
    return y.reshape(*lead, *fan_out)
