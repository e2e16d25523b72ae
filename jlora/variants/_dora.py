"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation.

DoRA splits the adapted weight into a trained magnitude and a direction,

    W = m * V / ||V||_c,    V = W0 + scale * a b,

where ``||V||_c`` is the norm of each column of the ``(fan_in, fan_out)`` kernel (one per output
unit, over the fan-in; PEFT's ``weight_norm`` over ``in_features`` of its ``(out, in)`` weight)
and ``m: (*fan_out,)`` starts at ``||W0 + scale a b||_c`` (``||W0||_c`` for fresh adapters), so
the adapted model starts as the base. The layer output is ``x W = (x W0 + scale (x a) b) * m /
||V||_c``, and the column norms expand without forming ``V``:

    ||v_j||^2 = ||w_j||^2 + 2 scale (a^T w_j) . b_j + scale^2 b_j^T (a^T a) b_j

``a^T W0`` is one ``(r, fan_out)`` product with ``W0`` (as costly as one row of ``x W0`` per rank),
``||w_j||^2`` a batched dot, ``a^T a`` is ``(r, r)``. Nothing of ``W0``'s shape is formed in the
forward or backward pass (``tests/test_variants_dora.py`` checks the jaxpr). The magnitudes are a
separate pytree ``{path: m}`` next to the adapters, trained like them. ``detach_norm=True`` treats
``||V||_c`` as a constant in the backward pass, as the paper's section 4.3 and PEFT do (same
values, cheaper and different gradients).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from .. import _checks
from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from .._merge import factors_by_path
from .._paths import is_box, nest, path_to_str, unbox
from .._weight_merge import check_fit

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(x: jax.Array, y: jax.Array, dims: Any) -> jax.Array:
    return jax.lax.dot_general(x, y, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _column_norms(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``||W + scale a b||_c`` for ``w: (fan_in, fan_out)``, ``a: (fan_in, r)``, ``b: (r, fan_out)``,
    in float32, by the expansion (never forming ``W + scale a b``)."""
    a = a.astype(w.dtype)
    b32 = b.astype(jnp.float32)
    w_sq = _dot(w, w, (((0,), (0,)), ((1,), (1,))))  # (fan_out,): sum_i w_ij^2
    a_t_w = _dot(a, w, (((0,), (0,)), ((), ())))  # (r, fan_out)
    gram = _dot(a, a, (((0,), (0,)), ((), ())))  # (r, r)
    cross = jnp.sum(a_t_w * b32, axis=0)
    quad = jnp.sum(jnp.matmul(gram, b32, precision=_HIGHEST) * b32, axis=0)
    # Rounding can take a (near-)zero column's square slightly below zero.
    return jnp.sqrt(jnp.maximum(w_sq + (2.0 * scale) * cross + (scale * scale) * quad, 0.0))


def _one_layer(w0: Any, factors: Any, op: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    if not isinstance(factors, LoraFactors):
        raise TypeError(
            f"{op}: factors is {_checks.found(factors)}; expected one layer's jlora.LoraFactors"
        )
    layout = factors.layout
    if layout.order or layout.embedding or w0.ndim != layout.fan_in_ndim + layout.fan_out_ndim:
        raise AdapterMismatchError(
            f"{op}: the weight has shape {tuple(w0.shape)} and layout {layout}; DoRA's factored "
            "form takes one layer's kernel in (fan_in..., fan_out...) order (no stack axes, no "
            "transposed or embedding layouts). Slice stacked weights, or use dora_merge"
        )
    check_fit(op, w0, factors)
    fan_in = math.prod(w0.shape[: layout.fan_in_ndim])
    w = w0.reshape(fan_in, -1)
    return w, factors.a.reshape(fan_in, -1), factors.b.reshape(factors.rank, -1)


def dora_dense(
    x: jax.Array,
    w0: jax.Array,
    factors: LoraFactors,
    magnitude: jax.Array,
    *,
    detach_norm: bool = False,
) -> jax.Array:
    """A DoRA layer's output ``x (m * V / ||V||_c)``, ``V = W0 + scale a b``, never forming ``V``.

    Unlike :func:`jlora.ops.dense_branch` this returns the whole output (the base term is
    rescaled too); add the bias after it.

    Args:
        x: ``(..., *fan_in)``.
        w0: the frozen kernel, ``(*fan_in, *fan_out)``.
        factors: its adapter, ``a: (*fan_in, r)``, ``b: (r, *fan_out)``.
        magnitude: ``m: (*fan_out,)``, from :func:`dora_magnitudes` then trained.
        detach_norm: stop gradients through ``||V||_c`` (the paper's section 4.3; PEFT does).

    Returns:
        ``(..., *fan_out)`` in ``x``'s dtype.

    Raises:
        AdapterMismatchError: the factors or the magnitude do not fit ``w0``, or ``w0`` has stack
            axes or a non-canonical layout.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.variants import dora_dense, dora_magnitudes
        >>> w0 = jnp.array([[3.0, 0.0], [4.0, 1.0]])
        >>> f = jlora.init(jax.random.key(0), {"w": w0}, jlora.LoraConfig("w", rank=1))["w"]
        >>> m = dora_magnitudes({"w": w0}, {"w": f})["w"]
        >>> m.tolist(), dora_dense(jnp.ones((1, 2)), w0, f, m).tolist()  # at init: the base
        ([5.0, 1.0], [[7.0, 1.0]])
    """
    _checks.flag(detach_norm, "dora_dense: detach_norm")
    w, a, b = _one_layer(w0, factors, "dora_dense")
    fan_out = w0.shape[factors.layout.fan_in_ndim :]
    if tuple(magnitude.shape) != tuple(fan_out):
        raise AdapterMismatchError(
            f"dora_dense: magnitude has shape {tuple(magnitude.shape)} but the weight's fan-out is "
            f"{tuple(fan_out)}; expected one magnitude per output unit (dora_magnitudes makes them)"
        )
    n_in = factors.layout.fan_in_ndim
    if tuple(x.shape[x.ndim - n_in :]) != tuple(w0.shape[:n_in]):
        raise AdapterMismatchError(
            f"dora_dense: input's last {n_in} axes {tuple(x.shape[x.ndim - n_in :])} do not match "
            f"the weight's fan-in {tuple(w0.shape[:n_in])}"
        )
    norms = _column_norms(w, a, b, factors.scale)
    if detach_norm:
        norms = jax.lax.stop_gradient(norms)
    lead = x.shape[: x.ndim - n_in]
    rows = x.reshape(math.prod(lead), w.shape[0])
    dtype = x.dtype
    base = jnp.matmul(rows, w.astype(dtype))
    low = jnp.matmul(jnp.matmul(rows, a.astype(dtype)), b.astype(dtype))
    ratio = (magnitude.reshape(-1).astype(jnp.float32) / norms).astype(dtype)
    out = (base + jnp.asarray(factors.scale, dtype) * low) * ratio[None, :]
    return out.reshape(*lead, *fan_out)


def _factor_order(w: jax.Array, f: LoraFactors) -> tuple[jax.Array, tuple[int, ...]]:
    """``w`` as ``(*stack, fan_in, fan_out)`` and the factor-order shape to undo that."""
    layout = f.layout
    wf = jnp.transpose(w, layout.to_factor_order(w.ndim)) if layout.order else w
    stack, fan_in, _ = layout.split(tuple(w.shape))
    return wf.reshape(*stack, math.prod(fan_in), -1), tuple(wf.shape)


def _from_factor_order(x: jax.Array, shape: tuple[int, ...], f: LoraFactors) -> jax.Array:
    x = x.reshape(shape)
    return jnp.transpose(x, f.layout.from_factor_order(x.ndim)) if f.layout.order else x


def _table(params: Any, adapters: Any, op: str) -> list[tuple[str, Any, LoraFactors]]:
    _checks.adapters_given(adapters)
    table = factors_by_path(adapters)
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)
    weights = {path_to_str(p): unbox(w) for p, w in flat}
    out = []
    for path, f in table.items():
        if path not in weights:
            raise AdapterMismatchError(
                f"{path}: {op}: the adapters have factors here but the parameters have no such "
                "weight; were these adapters made for another model?"
            )
        w = weights[path]
        check_fit(path, w, f)
        if f.layout.embedding:
            raise AdapterMismatchError(
                f"{path}: {op}: DoRA normalises kernel columns; this weight is an embedding table "
                "(layout 'vo'). Leave embeddings out of the DoRA targets"
            )
        out.append((path, w, f))
    return out


def _norms(w: jax.Array, f: LoraFactors) -> jax.Array:
    w2, _ = _factor_order(w, f)
    a = f.a.reshape(*w2.shape[:-2], w2.shape[-2], f.rank)
    b = f.b.reshape(*w2.shape[:-2], f.rank, w2.shape[-1])
    fn = lambda w_, a_, b_: _column_norms(w_, a_, b_, f.scale)  # noqa: E731
    for _ in range(w2.ndim - 2):
        fn = jax.vmap(fn)
    stack, _, fan_out = f.layout.split(tuple(w.shape))
    return fn(w2, a, b).reshape(*stack, *fan_out)


def dora_magnitudes(params: Any, adapters: Any) -> dict[str, Any]:
    """The initial DoRA magnitudes: ``||W0 + scale a b||_c`` of each adapted weight, in float32.

    For fresh adapters (``b = 0``) that is ``||W0||_c`` and the DoRA model equals the base.

    Args:
        params: the base parameters.
        adapters: their adapters (from :func:`jlora.init`, or PiSSA's).

    Returns:
        ``{path: m}`` nested like the adapters, ``m: (*stack, *fan_out)``.

    Raises:
        AdapterMismatchError: an adapter does not fit its weight, or adapts an embedding table.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.variants import dora_magnitudes
        >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 2.0]])}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig("w", rank=1))
        >>> dora_magnitudes(params, adapters)["w"].tolist()
        [5.0, 2.0]
    """
    return nest({p: _norms(w, f) for p, w, f in _table(params, adapters, "dora_magnitudes")})
