"""DoRA inside the Flax transforms: one adapted layer's output from its base output.

Both transforms compute a DoRA layer as PEFT does (``peft.tuners.lora.dora``), from the layer's own
output ``y = x W0 + bias``:

    out = y + (ratio - 1) * (x W0) + ratio * scale (x a) b,      ratio = m / ||W0 + scale a b||_c

which is ``(x W0 + scale (x a) b) * m / ||V||_c + bias``. ``x W0`` is ``y - bias`` (without LoRA
dropout) or the layer's own product of the dropped input (with it, as PEFT). The column norms
come from the expansion of :mod:`jlora.variants._dora` (one rank-``r`` product with ``W0``;
nothing of ``W0``'s shape is formed). When ``m`` equals the norms bit for bit (fresh adapters,
the magnitudes computed by the same operations, as in an eager call), ``ratio`` is exactly 1 and
the term exactly 0, so the layer returns ``y`` itself.

The magnitudes are a pytree ``{weight path: m}`` beside the adapters (``m: (*stack, *fan_out)``,
from :func:`jlora.variants.dora_magnitudes`); in Linen they ride in the ``params`` collection at
``<weight path>@dora`` (so ``nn.scan`` slices them like the kernel), in NNX they are the
``lora_magnitude`` :class:`jlora.nnx.LoraParam` of the layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from .._paths import leaves_with_paths, unbox
from ..quant._weight import QuantizedWeight
from ._dora import _column_norms, _one_layer

DORA_SUFFIX = "@dora"  # a Linen weight's magnitude sits at <weight path>@dora in 'params'
MAGNITUDE = "lora_magnitude"  # an NNX layer's magnitude attribute


def magnitude_table(table: Mapping[str, LoraFactors], magnitudes: Any) -> dict[str, jax.Array]:
    """``{path: m}`` of a magnitude pytree, each path one that ``table`` has factors for.

    Raises:
        AdapterMismatchError: a magnitude has no factors at its path, or is not an array.
    """
    if magnitudes is None:
        return {}
    out = {}
    for path, m in leaves_with_paths(magnitudes):
        if not hasattr(m, "shape") or not hasattr(m, "dtype"):
            raise AdapterMismatchError(
                f"{path}: magnitudes hold a {type(m).__name__}; expected one array per adapted "
                "weight, as jlora.variants.dora_magnitudes(params, adapters) returns"
            )
        if path not in table:
            raise AdapterMismatchError(
                f"{path}: there is a DoRA magnitude here but the adapters have no factors at this "
                f"path (adapted: {sorted(table)[:8]}); make the magnitudes with "
                "jlora.variants.dora_magnitudes(params, adapters) from these adapters"
            )
        out[path] = m
    return out


def layer_ratio(path: str, kernel: Any, factors: LoraFactors, magnitude: Any) -> jax.Array:
    """``m / ||W0 + scale a b||_c`` of one layer (no stack axes), ``(*fan_out,)`` in float32.

    Raises:
        AdapterMismatchError: the kernel is quantised, or the factors or the magnitude do not fit.
    """
    if isinstance(kernel, QuantizedWeight):
        raise AdapterMismatchError(
            f"{path}: DoRA on a quantised kernel (jlora.quant) is not supported: its column norms "
            "need the dequantised weight. Use plain LoRA here, or a float base"
        )
    kernel = unbox(kernel)
    w, a, b = _one_layer(kernel, factors, f"{path}: DoRA")
    fan_out = tuple(kernel.shape[factors.layout.fan_in_ndim :])
    magnitude = unbox(magnitude)
    if tuple(magnitude.shape) != fan_out:
        raise AdapterMismatchError(
            f"{path}: the DoRA magnitude has shape {tuple(magnitude.shape)} but this layer's "
            f"fan-out is {fan_out}; expected one magnitude per output unit, from "
            "jlora.variants.dora_magnitudes(params, adapters)"
        )
    norms = _column_norms(w, a, b, factors.scale)
    return (magnitude.reshape(-1).astype(jnp.float32) / norms).reshape(fan_out)


def combine(y: jax.Array, xw: jax.Array, term: jax.Array, ratio: jax.Array) -> jax.Array:
    """``y + (ratio - 1) xw + ratio term``, the correction formed in (at least) float32."""
    dtype = jnp.promote_types(y.dtype, jnp.float32)
    r = lead(ratio, y.ndim).astype(dtype)
    correction = (r - 1) * xw.astype(dtype) + r * term.astype(dtype)
    return y + correction.astype(y.dtype)


def lead(x: jax.Array, ndim: int) -> jax.Array:
    """``x`` with leading unit axes up to ``ndim`` (explicit broadcasting over the batch)."""
    return x.reshape((1,) * (ndim - x.ndim) + tuple(x.shape))


def refuse(path: str, kind: str, supported: str) -> AdapterMismatchError:
    """The error for DoRA on a layer kind the transform cannot decompose."""
    return AdapterMismatchError(
        f"{path}: DoRA magnitudes are given for this {kind} layer, but DoRA in the Flax "
        f"transforms supports {supported} only (a column norm per output unit of a "
        "(fan_in, fan_out) kernel). Leave this path out of the magnitudes (it then trains as "
        "plain LoRA), or exclude it from the targets"
    )
