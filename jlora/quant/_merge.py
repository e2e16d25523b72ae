"""`merge` onto a quantised base: float weights ``dequantize(q) + delta``, optionally re-quantised.

What is exact and what is not:

- ``dequantize(q)`` is exact given the stored codes: ``code * absmax`` in float32, the same value
  on every call (the rounding happened once, in :func:`jlora.quant.quantize`).
- The merge is float arithmetic: ``dtype(f32(dequantize(q)) + f32(scale * a @ b))``, the delta
  summed in float32 with ``Precision.HIGHEST`` and one rounding to ``dtype``, as
  :func:`jlora.merge` does for a float base.
- Re-quantising is lossy: the merged weight goes through the code book again. The report gives,
  per weight, how far the re-quantised weight is from the float merge.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .. import _checks
from .._errors import AdapterMismatchError
from .._merge import adapter_tables, check_fit, factor_delta
from .._merge import merge as float_merge
from .._paths import nest, path_to_str
from ._quantize import quantize_weight
from ._weight import QuantizedWeight, dequantize


@dataclasses.dataclass(frozen=True)
class RequantizationError:
    """How far one re-quantised weight is from its float merge (float64 statistics).

    Attributes:
        max_abs: largest absolute difference.
        rms: root mean square of the difference.
        relative_rms: ``rms`` over the root mean square of the float merge.
    """

    max_abs: float
    rms: float
    relative_rms: float


def _error(requantized: jax.Array, merged: jax.Array) -> RequantizationError:
    diff = requantized.astype(jnp.float32) - merged.astype(jnp.float32)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(diff))))
    scale = float(jnp.sqrt(jnp.mean(jnp.square(merged.astype(jnp.float32)))))
    return RequantizationError(float(jnp.max(jnp.abs(diff))), rms, rms / scale if scale else 0.0)


def _is_q(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def _roles(q: QuantizedWeight) -> str:
    """Role letters that quantise a weight as ``q`` was: its stack axes and int8's fan-in."""
    if q.kind == "int8":
        return "".join("i" if k in q.reduced_axes else "o" for k in range(q.ndim))
    return "s" * q.stack_ndim + "i" * (q.ndim - 1 - q.stack_ndim) + "o"


def merge(
    qparams: Any, adapters: Any, *, dtype: Any = jnp.bfloat16, requantize: bool = False
) -> Any:
    """Folds adapters into a quantised base; quantised weights come back as float ``dtype``.

    Each quantised weight becomes ``dtype(dequantize(q) + scale * a @ b)`` (computed in float32,
    one rounding), or ``dtype(dequantize(q))`` where it has no adapter. Float leaves merge as in
    :func:`jlora.merge` (their own dtype). With ``requantize=True`` each quantised weight is
    quantised again with its own kind, block size, double quantisation and axes.

    Args:
        qparams: a params tree holding :class:`QuantizedWeight` leaves.
        adapters: adapters for the float model's weights (:func:`jlora.init` shapes).
        dtype: the float dtype of the merged quantised weights (e.g. ``jnp.bfloat16``).
        requantize: re-quantise the merged weights and report the error.

    Returns:
        The merged tree; with ``requantize``, ``(tree, {path: RequantizationError})`` for every
        quantised weight.

    Raises:
        AdapterMismatchError: an adapter's path is missing or its factors do not fit the weight
            (e.g. adapters made for another model or another quantised layout).

    Example:
        >>> import jax, jax.numpy as jnp, jlora, jlora.quant
        >>> params = {"kernel": jax.random.normal(jax.random.key(0), (64, 64))}
        >>> config = jlora.LoraConfig(targets="kernel", rank=2)
        >>> q = jlora.quant.quantize(params, config)
        >>> adapters = jlora.init(jax.random.key(1), params, config)
        >>> merged = jlora.quant.merge(q, adapters, dtype=jnp.float32)
        >>> bool((merged["kernel"] == jlora.quant.dequantize(q["kernel"])).all())  # b = 0
        True
        >>> _, report = jlora.quant.merge(q, adapters, requantize=True)  # lossy: bf16, NF4 again
        >>> 0 < report["kernel"].relative_rms < 0.15
        True
    """
    _checks.adapters_given(adapters)
    _checks.flag(requantize, "requantize")
    table, extras = adapter_tables(adapters)
    report: dict[str, RequantizationError] = {}

    def leaf(path, w):
        if not isinstance(w, QuantizedWeight):
            return w
        key = path_to_str(path)
        factors = table.pop(key, None)
        if key in extras:
            raise AdapterMismatchError(
                f"{key}: the adapters hold a trainable extra (a full replacement) for a quantised "
                "weight; leave quantised weights out of LoraConfig.trainable"
            )
        base = dequantize(w, jnp.float32)
        if factors is None:
            merged = base.astype(dtype)
        else:
            check_fit(key, jax.ShapeDtypeStruct(w.shape, w.dtype), factors)
            merged = (base + factor_delta(factors)).astype(dtype)
        if not requantize:
            return merged
        out = quantize_weight(
            merged,
            kind=w.kind,
            block_size=w.block_size or 64,
            double_quant=w.double_quant,
            layout_roles=_roles(w),
        )
        report[key] = _error(dequantize(out, jnp.float32), merged)
        return out

    out = jax.tree_util.tree_map_with_path(leaf, qparams, is_leaf=_is_q)
    rest = {**table, **extras}
    if rest:
        # jlora.merge refuses quantised weights (a box it cannot refill): hide them from it.
        flat, treedef = jax.tree.flatten(out, is_leaf=_is_q)
        hidden = [None if _is_q(x) else x for x in flat]
        merged = jax.tree.leaves(float_merge(jax.tree.unflatten(treedef, hidden), nest(rest)))
        it = iter(merged)
        out = jax.tree.unflatten(treedef, [x if _is_q(x) else next(it) for x in flat])
    return (out, report) if requantize else out
