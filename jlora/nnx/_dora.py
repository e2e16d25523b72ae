"""DoRA layers in :mod:`jlora.nnx`: an adapted ``nnx.Linear`` / ``nnx.LinearGeneral`` with a
magnitude.

:func:`jlora.variants.dora_nnx` gives each chosen adapted layer a ``lora_magnitude``
:class:`~jlora.nnx.LoraParam` (``(*stack, *fan_out)``, so ``nnx.Optimizer(wrt=LoraParam)`` trains
it with the factors and ``nnx.scan`` slices it with the kernel); the layer's call then hands its
output to :func:`dora_call` instead of adding the plain LoRA term. The maths is in
:mod:`jlora.variants._dora_layers`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import ops
from .._errors import TargetError
from .._factors import LoraFactors
from ..quant._weight import QuantizedWeight
from ..variants._dora import dora_magnitudes
from ..variants._dora_layers import MAGNITUDE, combine, layer_ratio, lead
from ..variants._dora_merge import _merge_one
from ._adapted import LoraParam, weight_of
from ._kinds import _floating, factors_of, kind_of
from ._sharding import _like, new_factor, sharding_key

SUPPORTED = "nnx.Linear and nnx.LinearGeneral"


def _product(module: Any, x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    n_in = 1
    if isinstance(module, nnx.LinearGeneral):
        axes = sorted(a % x.ndim for a in module.axis)
        n_in = len(axes)
        x = jnp.moveaxis(x, axes, tuple(range(x.ndim - n_in, x.ndim)))
    return jnp.tensordot(x, kernel.astype(dtype), axes=n_in)


def dora_call(
    module: Any,
    term: Any,
    inputs: jax.Array,
    y: jax.Array,
    f: LoraFactors,
    rate: float,
    rng: Any,
    args: tuple,
    kwargs: dict,
) -> jax.Array:
    """The DoRA layer's output from its base output ``y``."""
    kernel = weight_of(module).get_value()
    ratio = layer_ratio(module.lora_path, kernel, f, module.lora_magnitude.get_value())
    x = _floating(jnp.asarray(inputs), y.dtype)
    bias = getattr(module, "bias", None)
    bias = None if bias is None else jnp.asarray(bias.get_value(), y.dtype)
    if rate > 0:
        # As PEFT: the rescaled base product is that of the dropped input too.
        x = ops.dropout(x, rate, rng)
        xw = _product(module, x, kernel, y.dtype)
    else:
        xw = y if bias is None else y - lead(bias, y.ndim)
    return combine(y, xw, term(module, x, y.dtype, f, 0.0, None, *args, **kwargs), ratio)


def add_magnitude(path: str, module: Any) -> None:
    """Gives one adapted layer its magnitude ``||W0 + scale a b||_c`` (DoRA from here on).

    Raises:
        TargetError: the layer is not an nnx.Linear / nnx.LinearGeneral, is quantised, or is DoRA
            already.
    """
    kind = kind_of(module)
    if kind is None or kind.cls not in (nnx.Linear, nnx.LinearGeneral):
        raise TargetError(
            f"{path}: this adapted layer is a {kind.name if kind else type(module).__name__}, "
            f"but DoRA in jlora.nnx supports {SUPPORTED} only (a column norm per output unit of "
            "a (fan_in, fan_out) kernel). Leave it out (paths=[...]), or exclude it from the "
            "LoRA targets"
        )
    if MAGNITUDE in vars(module):
        raise TargetError(f"{path}: the layer is DoRA already (it has a {MAGNITUDE!r})")
    w = weight_of(module).get_value()
    if isinstance(w, QuantizedWeight):
        raise TargetError(
            f"{path}: DoRA on a quantised kernel (jlora.quant) is not supported: its column "
            "norms need the dequantised weight. Leave it out (paths=[...])"
        )
    f = factors_of(module)
    m = dora_magnitudes({"w": w}, {"w": f})["w"]
    meta = {k: v for k, v in module.lora_a.get_metadata().items() if k.startswith("lora_")}
    setattr(module, MAGNITUDE, _magnitude_param(m, meta, module.lora_b, f))


def _magnitude_param(m: jax.Array, meta: dict[str, Any], b: Any, f: LoraFactors) -> Any:
    """The magnitude's ``LoraParam`` with ``b``'s sharding less its rank axis (metadata and
    placement): ``m`` has ``b``'s shape ``(*stack, r, *fan_out)`` without ``r``."""
    from ..checkpoint._magnitudes import sharding_of

    n_stack = f.a.ndim - 1 - f.layout.fan_in_ndim
    b_meta, b_value = b.get_metadata(), b.get_value()
    key = sharding_key(b_meta)
    if key is None:
        if isinstance(b_value, jax.Array) and not isinstance(b_value, jax.core.Tracer):
            sharding = sharding_of(b_value.sharding, n_stack)
            if isinstance(sharding, jax.sharding.NamedSharding):
                m = jax.device_put(m, sharding)
        return LoraParam(m, **meta)
    names = b_meta[key]
    entries = tuple(names.spec if isinstance(names, jax.sharding.NamedSharding) else names)
    meta[key] = _like(names, entries[:n_stack] + entries[n_stack + 1 :])
    meta.update({k: b_meta[k] for k in ("mesh", "eager_sharding", "sharding_rules") if k in b_meta})
    return new_factor(LoraParam, m, meta, b_value, "b")  # b lies on the weight's mesh, if any


def merged_weight(module: Any) -> jax.Array:
    """``m (W0 + scale a b) / ||W0 + scale a b||_c`` of a DoRA layer (float32, rounded once)."""
    w0 = weight_of(module).get_value()
    return _merge_one(jnp.asarray(w0), factors_of(module), module.lora_magnitude.get_value())
