"""DoRA layers in :mod:`jlora.linen`: ``nn.Dense`` and ``nn.DenseGeneral`` with a magnitude.

``LoraModel.apply(..., magnitudes=...)`` puts each magnitude at ``<weight path>@dora`` in the
``params`` collection (next to the factors at ``@lora``), and the interceptor hands a layer that
has one to :func:`dora_output` instead of adding the plain LoRA term. The maths is in
:mod:`jlora.variants._dora_layers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import ops
from .._factors import LoraFactors
from .._paths import unbox
from ..variants._dora_layers import DORA_SUFFIX, combine, layer_ratio, lead, refuse
from ._layer_kind import LayerKind, _arg
from ._layers import _general_axes

SUPPORTED = "nn.Dense and nn.DenseGeneral (without batch_dims)"


def add_magnitudes(injected: dict[str, Any], magnitudes: Mapping[str, Any]) -> dict[str, Any]:
    """``injected`` (the output of ``inject``) with each magnitude at ``<path>@dora``.

    Every magnitude path has factors, so ``inject`` already copied the dicts on its way: the
    user's params are not modified.
    """
    for path, m in magnitudes.items():
        *parents, name = path.split("/")
        node = injected
        for key in parents:
            node = node[key]
        node[name + DORA_SUFFIX] = m
    return injected


def _with_input(args: tuple, kwargs: dict, x: jax.Array) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "inputs": x}


def _product(module: Any, kind: LayerKind, x: jax.Array, kernel: Any, dtype: Any) -> jax.Array:
    """``x W0`` of a Dense / DenseGeneral (no batch_dims), the contracted axes moved last."""
    n_in = 1
    if kind.cls is nn.DenseGeneral:
        axis = _general_axes(module, x.ndim)[0]
        n_in = len(axis)
        x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n_in, x.ndim)))
    return jnp.tensordot(x, kernel.astype(dtype), axes=n_in)


def dora_output(
    kind: LayerKind,
    module: nn.Module,
    method: str,
    args: tuple,
    kwargs: dict,
    y: jax.Array,
    factors: LoraFactors,
    magnitude: Any,
    rate: float,
    rng: jax.Array | None,
    path: str,
) -> jax.Array:
    """The DoRA layer's output from its base output ``y`` (see :mod:`jlora.variants._dora_layers`).

    Raises:
        AdapterMismatchError: the layer is not a Dense/DenseGeneral, has ``batch_dims``, has a
            quantised kernel, or the magnitude does not fit it.
    """
    if kind.cls not in (nn.Dense, nn.DenseGeneral):
        raise refuse(path, kind.name, SUPPORTED)
    x = _arg(args, kwargs, 0, "inputs")
    if kind.cls is nn.DenseGeneral and _general_axes(module, jnp.ndim(x))[1]:
        raise refuse(path, "nn.DenseGeneral with batch_dims", SUPPORTED)
    ratio = layer_ratio(path, module.get_variable("params", kind.param), factors, magnitude)
    x = jnp.asarray(x, y.dtype)
    bias = module.get_variable("params", "bias") if module.use_bias else None
    bias = None if bias is None else jnp.asarray(unbox(bias), y.dtype)
    if rate > 0:
        # As PEFT: the rescaled base product is that of the dropped input too.
        x = ops.dropout(x, rate, rng)
        xw = _product(module, kind, x, unbox(module.get_variable("params", kind.param)), y.dtype)
    else:
        xw = y if bias is None else y - lead(bias, y.ndim)
    args, kwargs = _with_input(args, kwargs, x)
    term = kind.term(module, method, args, kwargs, factors, 0.0, None)
    return combine(y, xw, term, ratio)
