"""Mixed-batch LoRA terms: each example of a batch runs its own adapter from a bank.

For a layer input ``x: (B, ..., *fan_in)``, adapter ids ``ids: (B,)`` and one layer's bank factors
``a: (N, *fan_in, R)``, ``b: (N, R, *fan_out)``, ``scale: (N,)``, example ``e`` gets

    term[e] = scale[ids[e]] * (x[e] a[ids[e]]) b[ids[e]]        (0 where ids[e] == BASE)

which the caller adds to the frozen layer's output, computed once for the whole batch. The scale
multiplies the rank-``R`` intermediate. Three strategies compute the dense term (``strategy=``):

* ``"gather"``: gather each example's factors (``a[ids]: (B, fan_in, R)``) and run two batched
  matmuls. Cost: the single-adapter term's FLOPs plus copying ``B`` factor pairs.
* ``"segment"``: sort the rows by adapter and run grouped matmuls over the contiguous segments
  (``jax.lax.ragged_dot``, as Punica's SGMV), then unsort. Exactly the single-adapter FLOPs.
* ``"onehot"``: every row against every adapter at once (``x @ [a_0 ... a_{N-1}]``: rank
  ``N R``), masked to its own adapter, then one matmul with the stacked ``b``s. Plain 2-D
  matmuls, ``N`` times the FLOPs of the term.

All three give each example's term to float32 round-off (padded ranks add exact zeros, the base
id multiplies by an exact zero). ``benchmarks/serving.py`` measures them; ``"gather"`` is the
default (see docs/design.md, "Serving many adapters"). Lookups, tied heads (``attend``) and einsum
layers always gather.

**Pre-gathered factors.** ``ids=None`` means the factors are already one per example (axis 0 is
the batch; :func:`jlora.serving.gather` makes them from a bank and ids): no gather happens. A decode
loop, whose ids are fixed for the whole sequence, gathers once instead of at every step.

**Ids.** ``BASE`` (-1) means the base model alone: its term is an exact zero, so ``y + term == y``.
Eagerly, an id outside ``[-1, N)`` raises :class:`jlora.serving.BankError`; under ``jax.jit`` it
cannot raise, so the example's term (and output) is NaN rather than silently another adapter's.
"""

from __future__ import annotations

import math
import string

import jax
import jax.numpy as jnp
import numpy as np

from .. import _einsum
from .._errors import AdapterMismatchError, BankError
from ._slots import BASE, BankFactors

STRATEGIES = ("gather", "segment", "onehot")


def check_ids(ids: jax.Array, batch: int, capacity: int, op: str) -> None:
    """Shape and dtype always; range too when ``ids`` is concrete (not traced)."""
    if tuple(ids.shape) != (batch,) or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise BankError(
            f"{op}: ids have shape {tuple(ids.shape)} and dtype {ids.dtype}; expected one integer "
            f"adapter id per example, shape ({batch},) (the input's leading axis)"
        )
    if isinstance(ids, jax.core.Tracer):
        return
    values = np.asarray(ids)
    bad = np.flatnonzero((values < BASE) | (values >= capacity))
    if bad.size:
        raise BankError(
            f"{op}: example {int(bad[0])} has adapter id {int(values[bad[0]])}; expected {BASE} "
            f"(base only) or a slot 0 to {capacity - 1} of this bank"
        )


def example_scale(ids: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``(B,)``: each example's scale, 0 for :data:`BASE`, NaN for an id out of range."""
    n = scale.shape[0]
    s = jnp.take(scale, jnp.clip(ids, 0, n - 1)).astype(dtype)
    s = jnp.where(ids == BASE, jnp.zeros((), dtype), s)
    return jnp.where((ids < BASE) | (ids >= n), jnp.full((), jnp.nan, dtype), s)


def per_example(
    ids: jax.Array | None, factors: BankFactors, batch: int, op: str, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(a rows, b rows, scales)``, one of each per example: gathered by ``ids``, or, for
    ``ids=None``, the factors as given (already gathered by :func:`jlora.serving.gather`)."""
    a, b, n = factors.a, factors.b, factors.a.shape[0]
    if ids is None:
        if n != batch:
            raise BankError(
                f"{op}: ids=None means the factors are already one per example "
                f"(jlora.serving.gather), but they hold {n} rows for a batch of {batch}; gather "
                "them with this batch's ids, or pass the bank's factors and the ids"
            )
        return a, b, factors.scale.astype(dtype)
    check_ids(ids, batch, n, op)
    idx = jnp.clip(ids, 0, n - 1)
    return a[idx], b[idx], example_scale(ids, factors.scale, dtype)


def _layer(factors: BankFactors, op: str, n_extra: int = 0) -> tuple[jax.Array, jax.Array]:
    a, b = factors.a, factors.b
    want = factors.layout.fan_in_ndim + 2 + n_extra
    if a.ndim != want or factors.scale.shape != a.shape[:1]:
        raise AdapterMismatchError(
            f"{op}: bank factors a {a.shape}, scale {factors.scale.shape} are not one layer's "
            f"(expected a: (N, *fan_in, R) with {want} axes, scale: (N,)); slice scanned stacks "
            "first, or use jlora.serving.apply, which hands each layer its slice"
        )
    return a, b


def dense_term(
    x: jax.Array, ids: jax.Array | None, factors: BankFactors, *, strategy: str = "gather"
) -> jax.Array:
    """Each example's LoRA term of a Dense layer: ``scale[id] * (x a[id]) b[id]``.

    Args:
        x: ``(B, ..., *fan_in)``, the layer input with its contracted axes last.
        ids: ``(B,)`` adapter ids, :data:`BASE` for the base model; None for factors already
            gathered per example (:func:`jlora.serving.gather`).
        factors: one layer's bank factors ``a: (N, *fan_in, R)``, ``b: (N, R, *fan_out)``.
        strategy: ``"gather"``, ``"segment"`` or ``"onehot"`` (see the module docstring).

    Returns:
        ``(B, ..., *fan_out)`` in ``x``'s dtype.

    Raises:
        BankError: ``ids`` of the wrong shape, or (eagerly) out of range.
        AdapterMismatchError: factors that are not one layer's or do not fit ``x``.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.serving import BankFactors, dense_term
        >>> f = BankFactors(jnp.ones((2, 3, 1)), jnp.ones((2, 1, 4)), jnp.array([1.0, 2.0]),
        ...                 jlora.Layout(1, 1))
        >>> dense_term(jnp.ones((3, 3)), jnp.array([0, 1, -1]), f)[:, 0].tolist()
        [3.0, 6.0, 0.0]
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"dense_term: strategy {strategy!r} is unknown; expected {STRATEGIES}")
    a, b = _layer(factors, "dense_term")
    n_in = factors.layout.fan_in_ndim
    if x.shape[x.ndim - n_in :] != a.shape[1:-1] or x.ndim <= n_in:
        raise AdapterMismatchError(
            f"dense_term: input {x.shape} does not end in the bank's fan-in {a.shape[1:-1]} after "
            "a batch axis; were these factors made for another layer?"
        )
    n, rank, batch = a.shape[0], a.shape[-1], x.shape[0]
    fan_in, fan_out = math.prod(a.shape[1:-1]), b.shape[2:]
    rows = x.reshape(batch, -1, fan_in)
    if strategy == "gather" or ids is None:
        a_rows, b_rows, s = per_example(ids, factors, batch, "dense_term", x.dtype)
        a_rows = a_rows.reshape(batch, fan_in, rank).astype(x.dtype)
        xa = jnp.einsum("bti,bir->btr", rows, a_rows) * s[:, None, None]
        b_rows = b_rows.reshape(batch, rank, math.prod(fan_out)).astype(x.dtype)
        return jnp.einsum("btr,bro->bto", xa, b_rows).reshape(*x.shape[: x.ndim - n_in], *fan_out)
    check_ids(ids, batch, n, "dense_term")
    a2 = a.reshape(n, fan_in, rank).astype(x.dtype)
    b2 = b.reshape(n, rank, math.prod(fan_out)).astype(x.dtype)
    s = example_scale(ids, factors.scale, x.dtype)
    if strategy == "onehot":
        weights = jax.nn.one_hot(ids, n, dtype=x.dtype) * s[:, None]
        weights = jnp.where(jnp.isnan(s)[:, None], s[:, None], weights)  # keep NaN for bad ids
        a_all = jnp.transpose(a2, (1, 0, 2)).reshape(fan_in, n * rank)
        xa = jnp.matmul(rows, a_all).reshape(*rows.shape[:2], n, rank) * weights[:, None, :, None]
        out = jnp.matmul(xa.reshape(*rows.shape[:2], n * rank), b2.reshape(n * rank, -1))
    else:
        out = _segments(rows, ids, a2, b2, s)
    return out.reshape(*x.shape[: x.ndim - n_in], *fan_out)


def _segments(
    rows: jax.Array, ids: jax.Array, a: jax.Array, b: jax.Array, s: jax.Array
) -> jax.Array:
    batch, length, fan_in = rows.shape
    n = a.shape[0]
    row_ids = jnp.repeat(jnp.clip(ids, 0, n - 1), length)
    order = jnp.argsort(row_ids, stable=True)
    sizes = jnp.bincount(row_ids, length=n).astype(jnp.int32)
    sorted_rows = rows.reshape(batch * length, fan_in)[order]
    xa = jax.lax.ragged_dot(sorted_rows, a, sizes) * jnp.repeat(s, length)[order][:, None]
    out_sorted = jax.lax.ragged_dot(xa, b, sizes)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)
    return out.reshape(batch, length, -1)


def lookup_term(tokens: jax.Array, ids: jax.Array | None, factors: BankFactors) -> jax.Array:
    """Each example's LoRA term of an embedding lookup: ``scale[id] * a[id][tokens] b[id]``.

    Args:
        tokens: ``(B, ...)`` integer token ids.
        ids: ``(B,)`` adapter ids, or None for factors gathered per example.
        factors: ``a: (N, vocab, R)``, ``b: (N, R, features)``.

    Returns:
        ``(B, ..., features)`` in the factors' dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.serving import BankFactors, lookup_term
        >>> f = BankFactors(jnp.ones((2, 5, 1)), jnp.ones((2, 1, 3)), jnp.array([1.0, 2.0]),
        ...                 jlora.Layout(1, 1, embedding=True))
        >>> lookup_term(jnp.array([[1, 2], [3, 4]]), jnp.array([1, -1]), f)[:, 0, 0].tolist()
        [2.0, 0.0]
    """
    a, b = _layer(factors, "lookup_term")
    batch = tokens.shape[0]
    if ids is None:
        a_rows, b_rows, s = per_example(ids, factors, batch, "lookup_term", a.dtype)
        rows = a_rows[jnp.arange(batch).reshape(batch, *(1,) * (tokens.ndim - 1)), tokens]
    else:  # gather the looked-up rows of a, not every example's whole table
        check_ids(ids, batch, a.shape[0], "lookup_term")
        idx = jnp.clip(ids, 0, a.shape[0] - 1)
        rows = a[idx.reshape(batch, *(1,) * (tokens.ndim - 1)), tokens]  # (B, ..., R)
        b_rows, s = b[idx], example_scale(ids, factors.scale, a.dtype)
    s = s.reshape(batch, *(1,) * tokens.ndim)
    out = jnp.einsum("btr,bro->bto", (rows * s).reshape(batch, -1, a.shape[-1]), b_rows)
    return out.reshape(*tokens.shape, b.shape[-1])


def attend_term(x: jax.Array, ids: jax.Array | None, factors: BankFactors) -> jax.Array:
    """Each example's LoRA term of a tied embedding head: ``scale[id] * (x b[id]^T) a[id]^T``.

    Args:
        x: ``(B, ..., features)``.
        ids: ``(B,)`` adapter ids, or None for factors gathered per example.
        factors: ``a: (N, vocab, R)``, ``b: (N, R, features)``.

    Returns:
        ``(B, ..., vocab)`` in ``x``'s dtype.
    """
    a, _ = _layer(factors, "attend_term")
    batch = x.shape[0]
    a_rows, b_rows, s = per_example(ids, factors, batch, "attend_term", x.dtype)
    rows = x.reshape(batch, -1, x.shape[-1])
    xb = jnp.einsum("btf,brf->btr", rows, b_rows.astype(x.dtype)) * s[:, None, None]
    out = jnp.einsum("btr,bvr->btv", xb, a_rows.astype(x.dtype))
    return out.reshape(*x.shape[:-1], a.shape[1])


def _expand_ellipsis(equation: str, ndim: int) -> str:
    """``'...hj,hjd->...d'`` with the input's leading ``...`` spelled out in fresh letters, so the
    first letter is the batch axis."""
    lhs, _, rest = equation.replace(" ", "").partition(",")
    kernel, _, out = rest.partition("->")
    if not lhs.startswith("...") or "..." not in out or "..." in kernel:
        return equation
    fresh = [c for c in string.ascii_letters if c not in equation][: ndim - (len(lhs) - 3)]
    return equation.replace(" ", "").replace("...", "".join(fresh))


def einsum_term(
    equation: str, x: jax.Array, ids: jax.Array | None, factors: BankFactors
) -> jax.Array:
    """Each example's LoRA term of an einsum layer ``'<input>,<kernel>-><output>'``.

    The input's first letter is the batch axis: it must appear in the output and not in the
    kernel. The factors are ``a: (N, *shared, *fan_in, R)``, ``b: (N, *shared, R, *fan_out)`` with
    roles from ``factors.layout`` (see :mod:`jlora._einsum`).

    Returns:
        The term, shaped like the layer's output, in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.serving import BankFactors, einsum_term
        >>> f = BankFactors(jnp.ones((2, 3, 1)), jnp.ones((2, 1, 2, 2)), jnp.array([1.0, 2.0]),
        ...                 jlora.Layout.parse("ioo"))
        >>> einsum_term("BTD,DNH->BTNH", jnp.ones((2, 5, 3)), jnp.array([1, 0]), f).shape
        (2, 5, 2, 2)
    """
    equation = _expand_ellipsis(equation, x.ndim)
    try:
        eq = _einsum.parse(equation)
    except _einsum.EinsumUnsupported as e:
        raise AdapterMismatchError(f"einsum_term: {e}") from None
    roles = factors.layout.roles(len(eq.kernel))
    batch_letter = eq.lhs[:1]
    if not batch_letter.isalpha() or batch_letter not in eq.out or batch_letter in eq.kernel:
        raise AdapterMismatchError(
            f"einsum_term: {equation!r}: the input's first letter must be a batch axis (in the "
            "output, not in the kernel) for a per-example adapter"
        )
    letters = {
        r: "".join(c for c, g in zip(eq.kernel, roles, strict=True) if g == r) for r in "sio"
    }
    _layer(factors, "einsum_term", n_extra=len(letters["s"]))
    a_rows, b_rows, s = per_example(ids, factors, x.shape[0], "einsum_term", x.dtype)
    r = next(c for c in string.ascii_letters if c not in eq.text)
    a_letters = batch_letter + letters["s"] + letters["i"] + r
    b_letters = batch_letter + letters["s"] + r + letters["o"]
    kept = "".join(dict.fromkeys(c for c in eq.lhs if c in eq.out or c in b_letters))
    mid = kept + "".join(c for c in letters["s"] if c not in eq.lhs) + r
    xa = jnp.einsum(f"{eq.lhs},{a_letters}->{mid}", x, a_rows.astype(x.dtype))
    s = s.reshape(-1, *(1,) * (len(mid) - 1))
    return jnp.einsum(f"{mid},{b_letters}->{eq.out}", xa * s, b_rows.astype(x.dtype))
