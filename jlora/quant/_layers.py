"""The base output of adapted layers whose weight is quantised, for jlora.linen and jlora.nnx.

Reading a quantised kernel through Flax (``self.param`` in Linen, ``kernel[...]`` in NNX) gives
the layer a dense ``dequantize(q)``, which autodiff then keeps for the backward pass. The adapted
layers instead compute their base output here, never holding the whole float weight:

* ``nn.Dense``, ``nn.DenseGeneral`` (no ``batch_dims``), ``nnx.Linear``: :func:`quantized_matmul`.
* ``nn.Einsum`` / ``nnx.Einsum`` (any axis order), ``nn.Conv`` / ``nnx.Conv`` (split along
  ``c_in``), ``attend`` of ``nn.Embed`` / ``nnx.Embed`` (split along the vocabulary):
  :func:`jlora.quant._blockwise.blockwise`, which runs the layer's own computation on one
  dequantised block of the kernel at a time.
* an embedding lookup: only the gathered rows are dequantised (:mod:`jlora.quant._gather`).

Each function follows the layer's own call (dtype promotion with the layer's ``promote_dtype``,
precision, bias) and returns None where it does not apply (a float weight, a custom
``dot_general``, batch dims, a grouped or masked conv, a one-row table, other layers), so the
caller runs the layer as it is and the weight is dequantised whole inside the layer's call.

In Linen, ``nn.Embed`` reads its table in ``setup``, so a traced program also holds an unused
``dequantize`` of the whole table; under ``jax.jit`` XLA removes it (eagerly it is computed).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .. import _einsum
from .._paths import unbox
from ._blockwise import blockwise
from ._gather import lookup
from ._product import block_rows, fits, quantized_matmul
from ._weight import QuantizedWeight


def _arg(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs.get(name)


def _stand_in(q: QuantizedWeight) -> Any:
    # promote_dtype needs an array of the kernel's dtype and rank; an empty one costs nothing.
    return jnp.zeros((0,) * q.ndim, q.dtype)


def _linen_block(module: Any, param: str, method: Any, *args: Any, **fields: Any):
    """``(x, w) -> output``: a copy of the Linen layer run on a kernel block (no bias).

    ``method`` is the layer kind's own method (``nn.Conv.__call__``), not a subclass's override,
    which runs around this call as it would around the unsplit one.
    """
    clone = module.clone(parent=None, **fields)

    def fn(x, w):
        return clone.apply({"params": {param: w}}, x, *args, method=method)

    return fn


def _einsum_axes(eq: _einsum.Equation, q: QuantizedWeight) -> tuple[int, int | None, int | None]:
    """The kernel axis to split (the longest but the last) and its input and output axes."""
    axis = max(range(q.ndim - 1), key=lambda k: q.shape[k])
    letter = eq.kernel[axis]

    def position(spec: str) -> int | None:
        if letter not in spec:
            return None
        before, ellipsis, after = spec.partition("...")
        if letter in before or not ellipsis:
            return before.index(letter)
        return after.index(letter) - len(after)

    return axis, position(eq.lhs), position(eq.out)


def _einsum_bias(eq: _einsum.Equation, q: QuantizedWeight, y: Any, bias: Any) -> Any:
    """``y + bias`` broadcast as the einsum layers do (the output letters the kernel has)."""
    before, ellipsis, after = eq.out.partition("...")
    letters = before + "." * (y.ndim - len(before) - len(after)) + after
    shape = [q.shape[eq.kernel.index(c)] if c in eq.kernel else 1 for c in letters]
    return y + jnp.reshape(bias, shape)


def _einsum_equation(text: Any, q: QuantizedWeight) -> _einsum.Equation | None:
    try:
        eq = _einsum.parse(text)
    except (_einsum.EinsumUnsupported, AttributeError):
        return None
    return eq if len(eq.kernel) == q.ndim and q.ndim >= 2 else None


def _conv_axes(q: QuantizedWeight) -> dict[str, Any]:
    return {"axis": q.ndim - 2, "x_axis": -1, "y_axis": None}


def _bias_last(y: Any, bias: Any) -> Any:
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _linen_other(kind_name: str, module: Any, args: tuple, kwargs: dict) -> Any:
    """nn.Einsum, nn.Conv and nn.Embed over a quantised weight, or None."""
    import flax.linen as nn
    param = "embedding" if kind_name == "nn.Embed" else "kernel"
    q = module.get_variable("params", param)
    x = _arg(args, kwargs, "query" if "query" in kwargs else "inputs")
    if not isinstance(q, QuantizedWeight) or x is None:
        return None
    x = jnp.asarray(x)
    if kind_name == "nn.Embed":
        if module.num_embeddings == 1 or len(args) + len(kwargs) != 1:
            return None
        if jnp.issubdtype(x.dtype, jnp.integer):  # __call__ (attend takes a float query)
            (stand,) = module.promote_dtype(_stand_in(q), dtype=module.dtype, inexact=False)
            return lookup(q, x, stand.dtype)
        x, stand = module.promote_dtype(x, _stand_in(q), dtype=module.dtype)
        fn = _linen_block(module, param, nn.Embed.attend, num_embeddings=block_rows(q.shape[0]))
        return blockwise(fn, x, q, axis=0, x_axis=None, y_axis=-1, dtype=stand.dtype)
    bias = unbox(module.get_variable("params", "bias")) if module.use_bias else None
    if kind_name == "nn.Conv":
        if module.feature_group_count != 1 or module.mask is not None or len(args) != 1:
            return None
        x, stand, bias = module.promote_dtype(x, _stand_in(q), bias, dtype=module.dtype)
        fn = _linen_block(module, param, nn.Conv.__call__, use_bias=False)
        y = blockwise(fn, x, q, **_conv_axes(q), dtype=stand.dtype)
        return _bias_last(y, bias)
    # nn.Einsum
    text = args[1] if len(args) > 1 else kwargs.get("einsum_str", module.einsum_str)
    eq = _einsum_equation(text, q)
    if eq is None or len(args) + len(kwargs) > 2:
        return None
    x, stand, bias = module.promote_dtype(x, _stand_in(q), bias, dtype=module.dtype)
    axis, x_axis, y_axis = _einsum_axes(eq, q)
    block = tuple(block_rows(s) if k == axis else s for k, s in enumerate(q.shape))
    call = (text,) if module.einsum_str is None else ()
    fn = _linen_block(module, param, nn.Einsum.__call__, *call, shape=block, use_bias=False)
    y = blockwise(fn, x, q, axis=axis, x_axis=x_axis, y_axis=y_axis, dtype=stand.dtype)
    return y if bias is None else _einsum_bias(eq, q, y, bias)


def linen_base(kind_name: str, module: Any, args: tuple, kwargs: dict) -> Any:
    """The output of the Linen layer's own call over a quantised weight, or None."""
    if kind_name in ("nn.Einsum", "nn.Conv", "nn.Embed"):
        return _linen_other(kind_name, module, args, kwargs)
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


class _Held:
    """Stands in for an ``nnx.Param`` holding a kernel block (layers read it as ``p[...]``)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.shape, self.dtype = value.shape, value.dtype

    def __getitem__(self, index: Any) -> Any:
        return self.value


def _nnx_block(own: Any, module: Any, param: str, *args: Any) -> Any:
    """``(x, w) -> output``: the NNX layer's own method run on a kernel block (no bias)."""

    def fn(x, w):
        proxy = object.__new__(type(module))
        proxy.__dict__.update(vars(module), **{param: _Held(w)}, bias=None, use_bias=False)
        return own(proxy, x, *args)

    return fn


def _nnx_other(own: Any, module: Any, args: tuple, kwargs: dict) -> Any:
    """nnx.Einsum, nnx.Conv and nnx.Embed over a quantised weight value, or None."""
    from flax import nnx

    kinds = {
        nnx.Embed.__call__: "lookup",
        nnx.Embed.attend: "attend",
        nnx.Conv.__call__: "conv",
        nnx.Einsum.__call__: "einsum",
    }
    what = kinds.get(own)
    if what is None or any(v is not None for v in kwargs.values()) or not args:
        return None
    param = "embedding" if what in ("lookup", "attend") else "kernel"
    q = getattr(module, param).get_value()
    if not isinstance(q, QuantizedWeight):
        return None
    x = jnp.asarray(args[0])
    if what == "lookup":
        if module.num_embeddings == 1 or len(args) != 1:
            return None
        (stand,) = module.promote_dtype((_stand_in(q),), dtype=module.dtype, inexact=False)
        return lookup(q, x, stand.dtype)
    if what == "attend":
        if len(args) != 1:
            return None
        x, stand = module.promote_dtype((x, _stand_in(q)), dtype=module.dtype)
        fn = _nnx_block(own, module, param)
        return blockwise(fn, x, q, axis=0, x_axis=None, y_axis=-1, dtype=stand.dtype)
    bias = module.bias.get_value() if module.bias is not None else None
    if what == "conv":
        if module.feature_group_count != 1 or module.mask is not None or len(args) != 1:
            return None
        x, stand, bias = module.promote_dtype((x, _stand_in(q), bias), dtype=module.dtype)
        y = blockwise(_nnx_block(own, module, param), x, q, **_conv_axes(q), dtype=stand.dtype)
        return _bias_last(y, bias)
    text = args[1] if len(args) > 1 else module.einsum_str
    eq = _einsum_equation(text, q)
    if eq is None or len(args) > 2:
        return None
    x, stand, bias = module.promote_dtype((x, _stand_in(q), bias), dtype=module.dtype)
    axis, x_axis, y_axis = _einsum_axes(eq, q)
    fn = _nnx_block(own, module, param, text)
    y = blockwise(fn, x, q, axis=axis, x_axis=x_axis, y_axis=y_axis, dtype=stand.dtype)
    return y if bias is None else _einsum_bias(eq, q, y, bias)


def nnx_base(own: Any, module: Any, args: tuple, kwargs: dict) -> Any:
    """The output of ``own`` (a supported NNX layer's method) over a quantised weight, or None."""
    from flax import nnx

    if own is not nnx.Linear.__call__:
        return _nnx_other(own, module, args, kwargs)
    if len(args) != 1 or kwargs:
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
