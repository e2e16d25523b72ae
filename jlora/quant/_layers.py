"""The base product of Dense-like layers whose kernel is quantised, for jlora.linen and jlora.nnx.

Reading a quantised kernel through Flax (``self.param`` in Linen) gives the layer a dense
``dequantize(q)``, which autodiff then keeps for the backward pass. The adapted layers of
``jlora.linen`` (``nn.Dense``, ``nn.DenseGeneral`` without ``batch_dims``) and ``jlora.nnx``
(``nnx.Linear``) instead compute their base output here, with :func:`quantized_matmul`, which
never holds the whole float weight. Each function follows the layer's own ``__call__`` (dtype
promotion with the layer's ``promote_dtype``, precision, bias) and returns None where it does not
apply (a float kernel, a custom ``dot_general``, batch dims, other layers), so the caller runs the
layer as it is and the kernel is dequantised whole.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .._paths import unbox
from ._product import fits, quantized_matmul
from ._weight import QuantizedWeight


def _arg(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs.get(name)


def _stand_in(q: QuantizedWeight) -> Any:
    # promote_dtype needs an array of the kernel's dtype and rank; an empty one costs nothing.
    return jnp.zeros((0,) * q.ndim, q.dtype)


def linen_base(kind_name: str, module: Any, args: tuple, kwargs: dict) -> Any:
    """The output of the Linen layer's own ``__call__`` over a quantised kernel, or None."""
    if kind_name not in ("nn.Dense", "nn.DenseGeneral") or len(args) + len(kwargs) != 1:
        return None
    q = module.get_variable("params", "kernel")
    x = _arg(args, kwargs, "inputs")
    if not isinstance(q, QuantizedWeight) or x is None:
        return None
    if module.dot_general is not None or module.dot_general_cls is not None:
        return None
    bias = unbox(module.get_variable("params", "bias")) if module.use_bias else None
    x = jnp.asarray(x)
    if kind_name == "nn.Dense":
        n_in, axes = 1, (x.ndim - 1,)
    else:
        batch = module.batch_dims
        if (batch,) if isinstance(batch, int) else tuple(batch):
            return None
        raw = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        axes = tuple(sorted(a % x.ndim for a in raw))
        n_in = len(axes)
    if not fits(q, n_in) or tuple(x.shape[a] for a in axes) != q.shape[:n_in]:
        return None
    x, _, bias = module.promote_dtype(x, _stand_in(q), bias, dtype=module.dtype)
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - n_in, x.ndim)))
    y = quantized_matmul(x, q, n_in=n_in, precision=module.precision)
    if bias is not None:
        n_out = q.ndim - n_in
        y = y + jnp.reshape(bias, (1,) * (y.ndim - n_out) + tuple(bias.shape))
    return y


def nnx_base(own: Any, module: Any, args: tuple, kwargs: dict) -> Any:
    """The output of ``own`` (if ``nnx.Linear.__call__``) over a quantised kernel value, or None."""
    from flax import nnx

    if own is not nnx.Linear.__call__ or len(args) != 1 or kwargs:
        return None
    q = module.kernel.get_value()
    if not fits(q, 1) or module.preferred_element_type is not None:
        return None
    from jax import lax

    if module.dot_general is not lax.dot_general:
        return None
    bias = module.bias.get_value() if module.bias is not None else None
    x, _, bias = module.promote_dtype((args[0], _stand_in(q), bias), dtype=module.dtype)
    y = quantized_matmul(x, q, precision=module.precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y
