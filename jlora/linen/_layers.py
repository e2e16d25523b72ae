"""The flax.linen layer kinds jlora adapts: each one's weight layout and its factored LoRA term.

For every supported kind this module knows which parameter is adapted, which methods read it, how
its weight's axes split into fan-in and fan-out (from the module's attributes and call arguments,
never from shapes alone), and how to compute the adapter's term of the method's output through
:mod:`jlora.ops` without forming ``W0 + delta``:

    nn.Dense, nn.DenseGeneral, nn.Einsum:  y + scale * (drop(x) a) b
    nn.Conv:                               y + scale * conv(drop(x), a) b
    nn.Embed.__call__ / .attend:           y + scale * a[ids] b   /   y + scale * (drop(q) b^T) a^T

``y`` is the untouched module's own output (``W0`` is never modified); the term is added in ``y``'s
dtype. Lookups take no dropout (their input is an id, not an activation).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import _einsum, _explicit, ops
from .._factors import LoraFactors
from .._layout import Layout
from ._layer_kind import LayerKind, Unsupported, _arg, _tuple

SUPPORTED = (
    "nn.Dense, nn.DenseGeneral and nn.Einsum (their 'kernel'), nn.Conv ('kernel') and nn.Embed "
    "('embedding', for lookups and attend), their subclasses, and layers declared with "
    "layers={cls: jlora.CustomLayer(...)}"
)


# Dense ------------------------------------------------------------------------------------------


def _dense_layout(module: nn.Dense, method, args, kwargs) -> Layout:
    return Layout(1, 1)


def _dense_term(module, method, args, kwargs, factors, rate, rng):
    x = _arg(args, kwargs, 0, "inputs")
    return ops.dense_branch(x, factors, dropout_rate=rate, rng=rng)


# DenseGeneral -----------------------------------------------------------------------------------


def _general_axes(module: nn.DenseGeneral, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    axis = tuple(a % ndim for a in _tuple(module.axis))
    batch = tuple(a % ndim for a in _tuple(module.batch_dims))
    return axis, batch


def _general_layout(module: nn.DenseGeneral, method, args, kwargs) -> Layout:
    return Layout(len(_tuple(module.axis)), len(_tuple(module.features)))


def _general_term(module, method, args, kwargs, factors, rate, rng):
    x = _arg(args, kwargs, 0, "inputs")
    axis, batch = _general_axes(module, x.ndim)
    n_in = len(axis)
    if not batch:
        # dot_general keeps the input's free axes in order, then the features: moving the
        # contracted axes last (in kernel order) gives dense_branch the same product.
        moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - n_in, x.ndim)))
        return ops.dense_branch(moved, factors, dropout_rate=rate, rng=rng)
    # batch_dims: the kernel (and so each factor) has one slice per batch index, like stack axes.
    n_b = len(batch)
    a, b = factors.a.astype(x.dtype), factors.b.astype(x.dtype)
    x = ops.dropout(x, rate, rng)
    dims = ((axis, tuple(range(n_b, n_b + n_in))), (batch, tuple(range(n_b))))
    xa = jax.lax.dot_general(x, a, dims, out_sharding=_explicit.dot_sharding(x, a, dims))
    xa = xa * jnp.asarray(factors.scale, xa.dtype)
    dims = (((xa.ndim - 1,), (n_b,)), (tuple(range(n_b)), tuple(range(n_b))))
    return jax.lax.dot_general(xa, b, dims, out_sharding=_explicit.dot_sharding(xa, b, dims))


# Einsum -----------------------------------------------------------------------------------------


def _equation(module: nn.Einsum, args, kwargs) -> _einsum.Equation:
    try:
        return _einsum.parse(_arg(args, kwargs, 1, "einsum_str") or module.einsum_str)
    except _einsum.EinsumUnsupported as e:
        raise Unsupported(f"{e}. Exclude this path") from None


def _einsum_layout(module: nn.Einsum, method, args, kwargs) -> Layout:
    return _equation(module, args, kwargs).layout


def _einsum_choose(module: nn.Einsum, method, args, kwargs, chosen: Layout) -> Layout:
    try:
        return _einsum.layout_for(_equation(module, args, kwargs), chosen)
    except _einsum.EinsumUnsupported as e:
        raise Unsupported(str(e)) from None


def _einsum_term(module, method, args, kwargs, factors, rate, rng):
    x = ops.dropout(_arg(args, kwargs, 0, "inputs"), rate, rng)
    eq = _equation(module, args, kwargs)
    return _einsum.term(eq, factors.layout, x, factors.a, factors.b, factors.scale)


# Conv -------------------------------------------------------------------------------------------


def _conv_layout(module: nn.Conv, method, args, kwargs) -> Layout:
    if module.feature_group_count != 1:
        raise Unsupported(
            f"nn.Conv with feature_group_count={module.feature_group_count}: a grouped (or "
            "depthwise) kernel is block-diagonal, which a low-rank product a @ b does not keep. "
            "Exclude this path"
        )
    if module.mask is not None:
        raise Unsupported(
            "nn.Conv with a mask: the masked kernel W0 * mask has no factored LoRA update. Exclude "
            "this path"
        )
    return Layout(len(_tuple(module.kernel_size)) + 1, 1)


def _conv_padding(module: nn.Conv, n: int) -> str | list[tuple[int, int]]:
    padding = module.padding
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _conv_term(module, method, args, kwargs, factors, rate, rng):
    x = _arg(args, kwargs, 0, "inputs")
    window = _tuple(module.kernel_size)
    n = len(window)

    def per_axis(v: int | Sequence[int] | None) -> tuple[int, ...]:
        return (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)

    dilation = per_axis(module.kernel_dilation)
    padding = _conv_padding(module, n)
    # Dropout first, so the rows that padding copies (CIRCULAR, REFLECT) carry the same mask.
    x = ops.dropout(x, rate, rng)
    n_batch = x.ndim - n - 1
    if padding in ("CIRCULAR", "REFLECT"):
        spans = [(k - 1) * d + 1 for k, d in zip(window, dilation, strict=True)]
        pads = [(0, 0)] * n_batch + [((s - 1) // 2, s // 2) for s in spans] + [(0, 0)]
        x = jnp.pad(x, pads, mode="wrap" if padding == "CIRCULAR" else "reflect")
        padding = "VALID"
    elif padding == "CAUSAL":
        pads = [(0, 0)] * n_batch + [(dilation[0] * (window[0] - 1), 0), (0, 0)]
        x = jnp.pad(x, pads)
        padding = "VALID"
    return ops.conv_branch(
        x,
        factors,
        strides=per_axis(module.strides),
        padding=padding,
        input_dilation=per_axis(module.input_dilation),
        kernel_dilation=dilation,
    )


# Embed ------------------------------------------------------------------------------------------


def _embed_layout(module: nn.Embed, method, args, kwargs) -> Layout:
    return Layout(1, 1, embedding=True)


def _embed_term(module, method, args, kwargs, factors, rate, rng):
    if method == "attend":
        query = ops.dropout(_arg(args, kwargs, 0, "query"), rate, rng)
        return ops.attend_branch(query, factors)
    ids = _arg(args, kwargs, 0, "inputs")
    if module.num_embeddings == 1:
        # A one-row table is broadcast whatever the ids, as nn.Embed does.
        ids = jnp.zeros(ids.shape, jnp.int32)
    return ops.lookup_branch(ids, factors)


_KINDS: tuple[tuple[type, LayerKind], ...] = (
    (nn.Dense, LayerKind("nn.Dense", "kernel", ("__call__",), _dense_layout, _dense_term)),
    (
        nn.DenseGeneral,
        LayerKind("nn.DenseGeneral", "kernel", ("__call__",), _general_layout, _general_term),
    ),
    (
        nn.Einsum,
        LayerKind(
            "nn.Einsum",
            "kernel",
            ("__call__",),
            _einsum_layout,
            _einsum_term,
            choose=_einsum_choose,
        ),
    ),
    (
        nn.Conv,
        LayerKind("nn.Conv", "kernel", ("__call__",), _conv_layout, _conv_term, linear=False),
    ),
    (
        nn.Embed,
        LayerKind(
            "nn.Embed",
            "embedding",
            ("__call__", "attend"),
            _embed_layout,
            _embed_term,
            undropped=("__call__",),
            linear=False,
        ),
    ),
)
_KINDS = tuple((cls, dataclasses.replace(kind, cls=cls)) for cls, kind in _KINDS)


def kind_of(module: nn.Module, custom: tuple[tuple[type, LayerKind], ...] = ()) -> LayerKind | None:
    """The :class:`LayerKind` of ``module`` (subclasses included), or None if jlora cannot adapt it.

    Declared layers (``custom``) come first, so a declaration overrides a built-in kind.
    """
    for cls, kind in (*custom, *_KINDS):
        if isinstance(module, cls):
            return kind
    return None


def owns_call(kind: LayerKind, context: nn.module.InterceptorContext) -> bool:
    """Whether the intercepted call runs the kind's own method, not a subclass's override.

    A subclass that overrides ``__call__`` and calls ``super().__call__`` is intercepted twice;
    only the inner call (the kind's own method) gets the term, where it equals the merged layer.
    """
    if context.method_name not in kind.methods:
        return False
    run = getattr(context.orig_method, "func", context.orig_method)
    own = getattr(kind.cls, context.method_name, None)
    return own is not None and run is inspect.unwrap(own)


def kind_name(module: nn.Module) -> str:
    """``nn.Dense`` for flax.linen's own layers, the qualified class name otherwise."""
    cls = type(module)
    if cls.__module__.startswith("flax.linen"):
        return f"nn.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def add_term(
    kind: LayerKind,
    module: nn.Module,
    method: str,
    args: tuple,
    kwargs: dict,
    y: jax.Array,
    factors: LoraFactors,
    rate: float,
    rng: jax.Array | None,
) -> jax.Array:
    """``y`` plus the adapter's term, in ``y``'s dtype.

    Array inputs are cast to ``y``'s dtype first, as the layer's own promotion does; the ids of a
    lookup are left as they are.
    """
    if method not in kind.undropped:
        args = tuple(jnp.asarray(a, y.dtype) if _is_array(a) else a for a in args)
        kwargs = {k: jnp.asarray(v, y.dtype) if _is_array(v) else v for k, v in kwargs.items()}
    term = kind.term(module, method, args, kwargs, factors, rate, rng)
    # Under explicit sharding the term is laid out by its own products; the sum takes y's layout.
    return y + _explicit.like(term.astype(y.dtype), y)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")
