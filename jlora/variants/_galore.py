"""GaLore (Zhao et al. 2024): full-rank training with the optimizer run on low-rank gradients.

For each 2-D gradient ``G: (m, n)`` GaLore keeps an orthonormal projector onto the top-``r``
singular subspace of ``G`` on its smaller side, recomputed from the current gradient every
``update_proj_gap`` steps (``T``) and held fixed in between:

    m < n:   P = U[:, :r]  (m, r),   R = P^T G  (r, n),   update = scale * P inner(R)
    m >= n:  Q = V[:, :r]  (n, r),   R = G Q    (m, r),   update = scale * inner(R) Q^T

so the inner optimizer (Adam) keeps its moments for ``R`` only: ``r * max(m, n)`` entries per
moment instead of ``m * n``, plus the ``r * min(m, n)`` projector. The weights themselves train in
full; nothing about the model changes (no adapters). As in the paper, the inner state is kept
across refreshes (the moments of the old subspace carry over to the new one).

Leaves of other ranks (biases, norms, stacked or convolution kernels) go to the inner optimizer in
full, unscaled. To project only some leaves, or give the rest another optimizer, wrap with
``optax.partition``. Weight decay is the user's: the inner optimizer sees no parameters (its
``params`` are the projected ones' shapes only in name), so put ``optax.add_decayed_weights``
before the learning rate of a chain, or use ``optax.adamw``'s decay on unprojected leaves only.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _checks
from .._paths import path_to_str


class GaloreState(NamedTuple):
    """The state of :func:`galore`.

    Attributes:
        count: steps taken (the projectors refresh where ``count % update_proj_gap == 0``).
        projectors: a tree like the params: the orthonormal ``(m, r)`` or ``(n, r)`` float32
            projector of each projected leaf, ``optax.MaskedNode()`` at the others.
        inner_state: the inner optimizer's state, over the projected shapes.
    """

    count: jax.Array
    projectors: Any
    inner_state: Any


def _plan(x: Any, rank: int) -> tuple[str, int] | None:
    """``(side, r)`` for a leaf GaLore projects, ``None`` for one it passes through."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.floating):
        return None
    m, n = shape
    return ("right" if m >= n else "left"), min(rank, m, n)


def _low_shape(shape: tuple[int, int], side: str, r: int) -> tuple[int, int]:
    return (shape[0], r) if side == "right" else (r, shape[1])


def _basis(g: jax.Array, side: str, r: int) -> jax.Array:
    u, _, vt = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    return vt[:r].T if side == "right" else u[:, :r]


_HIGHEST = jax.lax.Precision.HIGHEST


def _project(g: jax.Array, p: jax.Array, side: str) -> jax.Array:
    g = g.astype(jnp.float32)
    return (
        jnp.matmul(g, p, precision=_HIGHEST)
        if side == "right"
        else jnp.matmul(p.T, g, precision=_HIGHEST)
    )


def _project_back(u: jax.Array, p: jax.Array, side: str) -> jax.Array:
    if side == "right":
        return jnp.matmul(u, p.T, precision=_HIGHEST)
    return jnp.matmul(p, u, precision=_HIGHEST)


def _positive_int(value: Any, name: str) -> int:
    return _checks.count(value, f"galore: {name}", 1)


def galore(
    inner: optax.GradientTransformation,
    rank: int,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on low-rank projections of each 2-D gradient (GaLore).

    The module docstring states the maths. A leaf with ``min(m, n) <= rank`` is projected at rank
    ``min(m, n)`` (an orthogonal change of basis). With that full rank and ``inner =
    optax.sgd(lr)``, the update is ``scale * (-lr G)``: plain SGD up to the scale (and to
    round-off). With Adam it is not Adam: Adam's per-element normalisation acts in the rotated
    basis.

    Args:
        inner: the optimizer for the projected gradients, e.g. ``optax.adam(1e-2)`` (its
            learning rate applies before the projection back, which is linear).
        rank: the projection rank ``r`` (>= 1).
        update_proj_gap: steps between refreshes of the projectors (the paper's ``T``).
        scale: the factor on each projected update (the paper's ``alpha``, 0.25 by default).

    Returns:
        An optax transformation with a :class:`GaloreState`.

    Raises:
        ValueError: ``rank`` or ``update_proj_gap`` is not an integer >= 1, ``scale`` is not a
            finite positive number.
        TypeError: ``inner`` is not an optax optimizer.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from jlora.variants import galore
        >>> params = {"w": jnp.ones((4, 64)), "bias": jnp.zeros(64)}
        >>> tx = galore(optax.sgd(1e-2, momentum=0.9), rank=2, update_proj_gap=100)
        >>> state = tx.init(params)
        >>> state.projectors["w"].shape, state.inner_state[0].trace["w"].shape
        ((4, 2), (2, 64))
        >>> grads = {"w": jnp.arange(256.0).reshape(4, 64), "bias": jnp.ones(64)}
        >>> updates, state = tx.update(grads, state)
        >>> updates["w"].shape, int(state.count)
        ((4, 64), 1)
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            f"galore: inner is {_checks.found(inner)}; expected an optax.GradientTransformation, "
            "e.g. optax.adam(1e-3) (the optimizer run in the projected space)"
        )
    rank = _positive_int(rank, "rank")
    gap = _positive_int(update_proj_gap, "update_proj_gap")
    real = not isinstance(scale, (bool, np.bool_)) and isinstance(
        scale, (int, float, np.integer, np.floating)
    )
    if not (real and 0 < scale < math.inf):
        raise ValueError(
            f"galore: scale={scale!r} is invalid; expected a finite number > 0 (the paper's "
            "alpha, 0.25 by default)"
        )
    scale = float(scale)

    def init_fn(params: Any) -> GaloreState:
        def projector(x: Any) -> Any:
            plan = _plan(x, rank)
            if plan is None:
                return optax.MaskedNode()
            side, r = plan
            return jnp.zeros((x.shape[1] if side == "right" else x.shape[0], r), jnp.float32)

        def low(x: Any) -> Any:
            plan = _plan(x, rank)
            return x if plan is None else jnp.zeros(_low_shape(x.shape, *plan), jnp.float32)

        projectors = jax.tree_util.tree_map(projector, params)
        return GaloreState(
            count=jnp.zeros([], jnp.int32),
            projectors=projectors,
            inner_state=inner.init(jax.tree_util.tree_map(low, params)),
        )

    def update_fn(
        updates: Any, state: GaloreState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, GaloreState]:
        del params  # the inner optimizer sees projected gradients only (see the module docstring)
        refresh = state.count % gap == 0
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        projectors = treedef.flatten_up_to(state.projectors)
        new_projectors, lows, plans = [], [], []
        for (path, g), p in zip(flat, projectors, strict=True):
            plan = _plan(g, rank)
            plans.append(plan)
            if plan is None:
                new_projectors.append(p)
                lows.append(g)
                continue
            want = (g.shape[1] if plan[0] == "right" else g.shape[0], plan[1])
            if tuple(p.shape) != want:
                raise ValueError(
                    f"galore: {path_to_str(path)}: the gradient has shape {tuple(g.shape)} but the "
                    f"state's projector is {tuple(p.shape)}; was the state made for other params?"
                )
            p = jax.lax.cond(
                refresh, lambda g=g, plan=plan: _basis(g, *plan), lambda p=p: p.astype(jnp.float32)
            )
            new_projectors.append(p)
            lows.append(_project(g, p, plan[0]))
        low_updates, inner_state = _inner_update(
            inner, treedef.unflatten(lows), state.inner_state, extra_args
        )
        out = []
        for (_, g), u, p, plan in zip(
            flat, treedef.flatten_up_to(low_updates), new_projectors, plans, strict=True
        ):
            if plan is None:
                out.append(u)
            else:
                out.append((scale * _project_back(u, p, plan[0])).astype(g.dtype))
        return treedef.unflatten(out), GaloreState(
            count=optax.safe_int32_increment(state.count),
            projectors=treedef.unflatten(new_projectors),
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _inner_update(inner: Any, updates: Any, state: Any, extra_args: dict) -> tuple[Any, Any]:
    if isinstance(inner, optax.GradientTransformationExtraArgs):
        return inner.update(updates, state, None, **extra_args)
    return inner.update(updates, state, None)


def state_bytes(state: Any) -> int:
    """The bytes of every array in an optimizer state (or any pytree).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from jlora.variants import state_bytes
        >>> state_bytes(optax.adam(1e-3).init({"w": jnp.zeros((64, 64))}))  # mu, nu, count
        32772
    """
    return sum(
        int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree_util.tree_leaves(state)
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )
