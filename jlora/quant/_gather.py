"""Embedding lookups over a quantised table: only the gathered rows are dequantised.

A lookup ``table[ids]`` needs no product: the codes and absmax constants of the looked-up rows
are gathered (4-bit blocks run along a row, so a row holds whole blocks), then decoded exactly as
:func:`jlora.quant.dequantize` decodes them. With double quantisation the 8-bit constants of
those rows are decoded with their own block's scale (``code * scale + offset`` in float32, as
``dequantize`` does), so nothing of the table but the gathered rows is ever in float. Ids out of
range give NaN rows and negative ids count from the end, as ``jnp.take`` on the float table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _codes
from ._weight import QuantizedWeight, absmax_of


def _rows_absmax(q: QuantizedWeight, ids: jax.Array) -> jax.Array:
    if not q.double_quant:
        return jnp.take(q.scales, ids, axis=0, mode="clip")
    if q.stack_ndim:  # a stacked table outside its scan: the constants are per slice
        return jnp.take(absmax_of(q), ids, axis=0, mode="clip")
    codes = jnp.take(q.scales, ids, axis=0, mode="clip").astype(jnp.float32)
    per_row = q.scales.shape[-1]
    columns = jnp.arange(per_row).reshape((1,) * ids.ndim + (per_row,))
    flat = jnp.clip(ids, 0, q.shape[0] - 1)[..., None] * per_row + columns
    scale = jnp.take(q.scale_scales, flat // _codes.DQ_BLOCK, axis=0)
    return codes * scale + q.scale_offset


def lookup(q: QuantizedWeight, ids: jax.Array, dtype: Any) -> jax.Array:
    """``dequantize(q).astype(dtype)[ids]`` for a table ``(rows, features)``, gathering first.

    Example:
        >>> import jax.numpy as jnp, jlora.quant
        >>> q = jlora.quant.quantize({"e": jnp.ones((8, 64))}, "e")["e"]
        >>> lookup(q, jnp.array([[1, 2]]), jnp.float32).shape
        (1, 2, 64)
    """
    given = jnp.asarray(ids)
    # jnp.take counts negative ids from the end; ids still out of range get the fill below.
    ids = jnp.where(given < 0, given + q.shape[0], given)
    codes = jnp.take(q.codes, ids, axis=0, mode="clip")
    if q.kind == "int8":
        scales = q.scales  # (1, features) per column, or (rows, 1) per row
        if scales.shape[0] == 1:
            scales = scales.reshape((1,) * ids.ndim + scales.shape[1:])
        else:
            scales = jnp.take(scales, ids, axis=0, mode="clip")
        rows = _codes.int8_dequantize(codes, scales)
    else:
        rows = _codes.decode(codes, _rows_absmax(q, ids), q.kind, q.block_size)
    # 0 for ids in range, NaN outside: jnp.take's fill on the float table.
    nan_outside = jnp.take(jnp.zeros(q.shape[:1], jnp.float32), given, axis=0)[..., None]
    return (rows + nan_outside).astype(q.dtype).astype(dtype)
