"""AdaLoRA's rank allocation (Zhang et al. 2023; the method is in :mod:`jlora.variants._adalora`).

The importance state (smoothed sensitivity and uncertainty of every entry), the triplet scores it
gives, the cubic total-rank schedule and the mask that keeps the top-``b(t)`` triplets over all
weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ConfigError
from .._paths import path_to_str
from ._adalora import _is_ada, _matrices, _table


class AdaloraState(NamedTuple):
    """Smoothed sensitivity ``ipt`` and uncertainty ``unc``, trees shaped like the adapters."""

    ipt: Any
    unc: Any


def adalora_state(adapters: Any) -> AdaloraState:
    """Zero smoothed sensitivity and uncertainty (float32) for ``adapters``."""
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), adapters)
    return AdaloraState(zeros, zeros)


def adalora_update_importance(
    state: AdaloraState, adapters: Any, grads: Any, *, beta1: float = 0.85, beta2: float = 0.85
) -> AdaloraState:
    """One EMA step of sensitivity ``|w dL/dw|`` and its uncertainty, for every entry.

    Args:
        state, adapters: the state (from :func:`adalora_state`) and the current adapters ``w``.
        grads: ``dL/dw``, a tree shaped like ``adapters`` (the loss gradient, regulariser or not).
        beta1, beta2: smoothing of the sensitivity and of its uncertainty (paper, PEFT: 0.85).

    Returns:
        The new state (traceable: call it inside the jitted step).

    Raises:
        ConfigError: a ``beta`` outside ``[0, 1)``.
    """
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(
                f"adalora_update_importance: {name}={beta!r} is outside [0, 1); expected an EMA "
                "factor such as 0.85 (the paper's value)"
            )

    s = jax.tree.map(
        lambda w, g: jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32)), adapters, grads
    )
    ipt = jax.tree.map(lambda i, x: beta1 * i + (1.0 - beta1) * x, state.ipt, s)
    unc = jax.tree.map(
        lambda u, x, i: beta2 * u + (1.0 - beta2) * jnp.abs(x - i), state.unc, s, ipt
    )
    return AdaloraState(ipt, unc)


def adalora_scores(state: AdaloraState) -> dict[str, jax.Array]:
    """Triplet scores ``s(lam_i) + mean_j s(p_ji) + mean_j s(q_ij)`` per path, ``(*stack, r)``."""
    ipt, unc = _table(state.ipt), _table(state.unc)
    out = {}
    for path, f in ipt.items():
        s = jax.tree.map(jnp.multiply, f, unc[path])  # s(w) = Ibar Ubar
        p, q = _matrices(s)
        out[path] = s.lam + jnp.mean(p, axis=-2) + jnp.mean(q, axis=-1)
    return out


def adalora_budget(
    step: Any, *, initial: int, target: int, warmup: int, final: int, total: int
) -> Any:
    """The cubic total-rank schedule ``b(t)`` of the paper (eq. 12, floored as PEFT).

    ``b0`` for ``t < warmup``; ``target`` for ``t >= total - final``; in between
    ``target + (initial - target) (1 - (t - warmup) / (total - final - warmup))^3``.

    Args:
        step: the step ``t`` (a Python int gives a Python int; an array is traceable, float32).
        initial: ``b0``, the total initial rank (sum of ``r`` over weights and stack slices).
        target: ``b_T``, the total rank to keep.
        warmup, final, total: ``t_i`` steps before pruning starts, the last ``t_f`` steps trained
            at the target budget, and the number of steps ``T``.

    Example:
        >>> [adalora_budget(t, initial=16, target=2, warmup=2, final=2, total=9) for t in (0, 4, 8)]
        [16, 5, 2]
    """
    span = total - final - warmup
    if not 0 <= target <= initial or warmup < 0 or final < 0 or span <= 0:
        raise ConfigError(
            f"adalora_budget: initial={initial}, target={target}, warmup={warmup}, final={final}, "
            f"total={total}; expected 0 <= target <= initial and warmup + final < total"
        )
    if isinstance(step, (int, np.integer)):
        if step < warmup:
            return initial
        if step >= total - final:
            return target
        return target + int((initial - target) * (1 - (step - warmup) / span) ** 3)
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - warmup) / span, 0.0, 1.0)
    cubic = jnp.floor((initial - target) * (1.0 - frac) ** 3).astype(jnp.int32)
    return jnp.where(frac >= 1.0, target, target + cubic)


def adalora_mask(adapters: Any, state: AdaloraState, budget: Any) -> Any:
    """Zeroes every ``lam`` outside the ``budget`` highest triplet scores across all weights.

    Exactly ``min(budget, total)`` triplets are kept (ties go to the earlier path, then the lower
    index). Traceable; ``budget`` (e.g. :func:`adalora_budget` at this step) may be an array.

    Args:
        adapters: the adapter tree.
        state: the importance state (scored by :func:`adalora_scores`).

    Returns:
        ``adapters`` with masked ``lam`` set to 0 (``p`` and ``q`` untouched).
    """
    table, scores = _table(adapters), adalora_scores(state)
    flat = jnp.concatenate([scores[path].reshape(-1) for path in table])
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    keep = rank < jnp.asarray(budget, jnp.int32)
    out, start = {}, 0
    for path, f in table.items():
        k = keep[start : start + f.lam.size].reshape(f.lam.shape)
        start += f.lam.size
        out[path] = dataclasses.replace(f, lam=jnp.where(k, f.lam, jnp.zeros_like(f.lam)))
    return jax.tree_util.tree_map_with_path(
        lambda p, f: out[path_to_str(p)] if _is_ada(f) else f, adapters, is_leaf=_is_ada
    )
