"""`blockwise`: a layer's base output over a quantised kernel, a block of one kernel axis at a time.

:func:`jlora.quant.quantized_matmul` is the Dense case. Every other layer jlora adapts (an einsum
in any axis order, a convolution, an embedding's ``attend``) is also linear in its input and in
its kernel, ``y = L(x, W)``, so splitting one kernel axis into blocks ``W_1 .. W_n`` splits the
product, by that axis's role:

* contracted (a fan-in axis, paired with an input axis): ``y = sum_k L(x_k, W_k)`` and
  ``dx_k = L(., W_k)^T g``;
* produced (a fan-out axis, paired with an output axis): ``y_k = L(x, W_k)`` and
  ``dx = sum_k L(., W_k)^T g_k``;
* shared (in the input and the output, e.g. a per-head kernel): ``y_k = L(x_k, W_k)`` and
  ``dx_k = L(., W_k)^T g_k``.

``L`` is the layer's own computation on a block (its dtype promotion, precision, padding), and
``L(., W_k)^T`` its VJP for the input. As in ``quantized_matmul`` the forward and the backward
pass are ``fori_loop``s that slice the codes by the loop counter and dequantise one block exactly
as :func:`jlora.quant.dequantize` does, so no float copy of the whole kernel exists and none is
kept for the backward pass; the residuals are the stored codes and scales. The block axis is
never the kernel's last (it holds the packed codes and their absmax blocks); a block holds at
most an eighth of that axis and at least 64 of its indices (or the whole axis). Contracted
blocks are summed in float32 after the layer rounds each block's output to its dtype: one more
rounding per block than the unsplit layer, nothing for float32 layers beyond the order of the sum.
The double-quantised absmax constants (1/``block_size`` of the values) are dequantised whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _codes
from ._product import _zero_cotangent, block_rows
from ._weight import QuantizedWeight, absmax_of


def dequantize_block(
    q: QuantizedWeight, absmax: Any, axis: int, start: Any, size: int, dtype: Any
) -> jax.Array:
    """``dequantize(q)[..., start:start + size, ...]`` along ``axis`` (not the last), in ``dtype``.

    ``absmax`` is :func:`absmax_of` ``(q)`` for 4-bit kinds (None for int8); values are those of
    :func:`jlora.quant.dequantize` (``code * absmax`` in float32, then the weight's dtype).
    """
    codes = jax.lax.dynamic_slice_in_dim(q.codes, start, size, axis)
    if q.kind == "int8":
        scales = q.scales
        if scales.shape[axis] != 1:
            scales = jax.lax.dynamic_slice_in_dim(scales, start, size, axis)
        w = _codes.int8_dequantize(codes, scales)
    else:
        s = jax.lax.dynamic_slice_in_dim(absmax, start, size, axis)
        w = _codes.decode(codes, s, q.kind, q.block_size)
    return w.astype(q.dtype).astype(dtype)


def blockwise(
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    q: QuantizedWeight,
    *,
    axis: int,
    x_axis: int | None,
    y_axis: int | None,
    dtype: Any,
) -> jax.Array:
    """``fn(x, dequantize(q))`` computed a block of ``q``'s ``axis`` at a time (module doc).

    Args:
        fn: ``(x block, kernel block) -> output block``, linear in both; the layer's own code.
        x: the layer input (its gradient flows; ``q`` gets a zero cotangent).
        q: the quantised kernel.
        axis: the kernel axis to split (not the last).
        x_axis: the input axis paired with ``axis`` (contracted or shared), or None.
        y_axis: the output axis paired with ``axis`` (produced or shared), or None.
        dtype: the dtype each kernel block is given to ``fn`` in (the layer's promoted dtype).

    Returns:
        What ``fn(x, dequantize(q).astype(dtype))`` returns, up to the order of the block sum.
    """
    if x_axis is None and y_axis is None:
        raise ValueError("blockwise: the kernel axis must pair with an input or an output axis")
    axis %= q.ndim
    if axis == q.ndim - 1 and q.kind != "int8":
        raise ValueError("blockwise: a 4-bit kernel cannot be split along its last axis")
    n = q.shape[axis]
    rows = block_rows(n)
    steps = n // rows
    x_axis = None if x_axis is None else x_axis % x.ndim
    block_shape = tuple(rows if k == axis else s for k, s in enumerate(q.shape))

    def x_block(x, start):
        return x if x_axis is None else jax.lax.dynamic_slice_in_dim(x, start, rows, x_axis)

    x_spec = jax.ShapeDtypeStruct(
        tuple(rows if k == x_axis else s for k, s in enumerate(x.shape)), x.dtype
    )
    y_spec = jax.eval_shape(fn, x_spec, jax.ShapeDtypeStruct(block_shape, dtype))
    y_ax = None if y_axis is None else y_axis % len(y_spec.shape)
    y_shape = tuple(s * steps if k == y_ax else s for k, s in enumerate(y_spec.shape))
    summed = y_ax is None
    acc = jnp.float32 if summed and jnp.issubdtype(y_spec.dtype, jnp.floating) else y_spec.dtype

    def weights(q):
        return None if q.kind == "int8" else absmax_of(q)

    def forward_loop(x, q):
        absmax = weights(q)

        def body(i, y):
            start = i * rows
            part = fn(x_block(x, start), dequantize_block(q, absmax, axis, start, rows, dtype))
            if summed:
                return y + part.astype(acc)
            return jax.lax.dynamic_update_slice_in_dim(y, part.astype(acc), start, y_ax)

        y = jax.lax.fori_loop(0, steps, body, jnp.zeros(y_shape, acc))
        return y.astype(y_spec.dtype)

    @jax.custom_vjp
    def product(x, q):
        return forward_loop(x, q)

    def forward(x, q):
        return forward_loop(x, q), q

    def backward(q, g):
        absmax = weights(q)

        def body(i, dx):
            start = i * rows
            w = dequantize_block(q, absmax, axis, start, rows, dtype)
            g_k = g if summed else jax.lax.dynamic_slice_in_dim(g, start, rows, y_ax)
            _, vjp = jax.vjp(lambda xs: fn(xs, w), x_block(x_like, start))
            (part,) = vjp(g_k.astype(y_spec.dtype))
            if x_axis is None:
                return dx + part.astype(dx.dtype)
            return jax.lax.dynamic_update_slice_in_dim(dx, part.astype(dx.dtype), start, x_axis)

        # fn is linear in x: its VJP needs x's shape only, never the saved input.
        x_like = jnp.zeros(x.shape, x.dtype)
        dx_acc = jnp.float32 if x_axis is None else x.dtype
        dx = jax.lax.fori_loop(0, steps, body, jnp.zeros(x.shape, dx_acc))
        return dx.astype(x.dtype), jax.tree.map(_zero_cotangent, q)

    product.defvjp(forward, backward)
    return product(x, q)
