"""What every factored product checks and tags: one layer's factors, a floating input, and the
``LORA_INPUT`` name of the adapter's input (see :mod:`jlora.ops`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _checks
from .._errors import AdapterMismatchError
from .._factors import LoraFactors

LORA_INPUT = "lora_input"  # the checkpoint_name of every adapter input (see the module docstring)


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
