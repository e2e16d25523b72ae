"""ReLoRA (Lialin et al. 2023): high-rank training through repeated low-rank updates.

Every ``restart_every`` steps the factors are merged into the base and re-initialised, so the total
update ``W_k - W_0 = sum_i scale * a_i b_i`` after ``k`` restarts has rank up to ``k * r`` while each
step trains rank-``r`` factors only. Three pieces make the loop:

* :func:`merge_and_reinit`: ``merge`` then ``init`` (``b = 0`` again, so the model's function is
  unchanged by a restart); merged weights stay on their base weights' shardings and new factors
  land on the old factors' shardings.
* :func:`reset_optimizer_state`: the paper's *partial* reset. Right after a restart the moments
  still describe the old factors; ReLoRA magnitude-prunes them (keeps the largest ``1 - ratio`` of
  each moment tensor by absolute value, zeroes the rest; the paper prunes 99%).
* :func:`relora_schedule`: the "jagged" cosine schedule. A linear warmup, then cosine decay to
  ``min_ratio * peak`` over the whole run, except that after each restart the rate drops to zero
  and climbs linearly, over ``restart_warmup_steps``, back to the cosine curve.

All three are plain functions of pytrees: the loop is the user's (see ``docs/design.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _checks
from .._config import LoraConfig
from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from .._factors import init as _init
from .._merge import merge as _merge
from .._paths import leaves_with_paths


def _is_factors(x: Any) -> bool:
    return isinstance(x, LoraFactors)


def relora_schedule(
    peak_value: float,
    *,
    total_steps: int,
    restart_every: int,
    warmup_steps: int,
    restart_warmup_steps: int,
    min_ratio: float = 0.1,
) -> optax.Schedule:
    """ReLoRA's jagged cosine schedule: cosine decay with a short warm restart after each merge.

    With ``p(t) = (t - warmup_steps) / (total_steps - warmup_steps)`` and
    ``cos(t) = min_ratio + (1 - min_ratio) (1 + cos(pi p(t))) / 2``, the rate at step ``t`` is

    * ``peak * t / warmup_steps`` for ``t < warmup_steps`` (the first warmup);
    * ``peak * (t mod T) / restart_warmup_steps * cos(k T + restart_warmup_steps)`` for
      ``t >= T`` with ``t mod T < restart_warmup_steps`` (``T = restart_every``, ``k = t // T``):
      from zero back to the cosine's value at the end of the warm restart;
    * ``peak * cos(t)`` otherwise.

    This is the schedule of the authors' code (``get_cosine_schedule_with_multiple_warmups``).

    Args:
        peak_value: the largest learning rate.
        total_steps: the length of the cosine decay (the whole run).
        restart_every: steps between merges (the paper's ``T``).
        warmup_steps: the first warmup, from zero.
        restart_warmup_steps: the warmup after each restart (< ``restart_every``).
        min_ratio: the rate at the end of the decay, relative to ``peak_value``.

    Returns:
        An ``optax.Schedule`` (``step -> rate``), usable inside ``jax.jit``.

    Raises:
        ValueError: a count is negative, ``restart_warmup_steps >= restart_every``, or
            ``min_ratio`` is outside ``[0, 1]``.

    Example:
        >>> from jlora.variants import relora_schedule
        >>> lr = relora_schedule(1.0, total_steps=100, restart_every=20, warmup_steps=10,
        ...                      restart_warmup_steps=5, min_ratio=0.0)
        >>> [round(float(lr(t)), 3) for t in (0, 5, 10, 20, 22, 25, 55)]
        [0.0, 0.5, 1.0, 0.0, 0.373, 0.933, 0.5]
    """
    total = _checks.count(total_steps, "relora_schedule: total_steps", 1)
    every = _checks.count(restart_every, "relora_schedule: restart_every", 1)
    warmup = _checks.count(warmup_steps, "relora_schedule: warmup_steps")
    restart_warmup = _checks.count(restart_warmup_steps, "relora_schedule: restart_warmup_steps")
    if restart_warmup >= every:
        raise ValueError(
            f"relora_schedule: restart_warmup_steps={restart_warmup} is not below "
            f"restart_every={every}; the warm restart must end before the next merge (the paper "
            "uses 50 of 5000)"
        )
    if not (isinstance(min_ratio, (int, float)) and 0.0 <= min_ratio <= 1.0):
        raise ValueError(
            f"relora_schedule: min_ratio={min_ratio!r} is invalid; expected a number in [0, 1] "
            "(the final rate relative to peak_value; the paper uses 0.1)"
        )
    span = float(max(1, total - warmup))

    def cosine(t: jax.Array) -> jax.Array:
        progress = (t - warmup) / span
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * progress))

    def schedule(count: Any) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        restart_step = jnp.mod(t, every)
        restart_number = jnp.floor(t / every)
        first = t / max(1, warmup)
        rewarm = restart_step / max(1, restart_warmup)
        rewarm = rewarm * cosine(restart_number * every + restart_warmup)
        rate = jnp.where(
            t < warmup,
            first,
            jnp.where((t >= every) & (restart_step < restart_warmup), rewarm, cosine(t)),
        )
        return peak_value * rate

    return schedule


def _check_ratio(ratio: Any) -> float:
    real = not isinstance(ratio, (bool, np.bool_)) and isinstance(
        ratio, (int, float, np.integer, np.floating)
    )
    if not (real and 0.0 <= ratio <= 1.0):
        raise ValueError(
            f"reset_optimizer_state: ratio={ratio!r} is invalid; expected the fraction of each "
            "moment to zero, a number in [0, 1] (the paper prunes 0.99; 1 is a full reset)"
        )
    return float(ratio)


@functools.partial(jax.jit, static_argnums=1)
def _prune_array(x: jax.Array, ratio: float) -> jax.Array:
    keep = x.size - math.floor(ratio * x.size)
    if keep == 0:
        return jnp.zeros_like(x)
    flat = x.reshape(-1)
    # top_k keeps exactly `keep` entries (ties go to the lower index), where a threshold would
    # keep all tied values.
    _, index = jax.lax.top_k(jnp.abs(flat), keep)
    kept = jnp.zeros(flat.shape, jnp.bool_).at[index].set(True)
    return jnp.where(kept, flat, jnp.zeros((), x.dtype)).reshape(x.shape)


def _prune(x: Any, ratio: float) -> Any:
    """``x`` with all but its ``n - floor(ratio * n)`` largest-magnitude entries set to zero."""
    if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.inexact) or x.size == 0:
        return x
    if math.floor(ratio * x.size) == 0:
        return x
    return _prune_array(x, ratio)


def reset_optimizer_state(opt_state: Any, ratio: float) -> Any:
    """ReLoRA's partial optimizer reset: magnitude-prunes the moments of every factor.

    optax keeps per-parameter state (Adam's ``mu`` and ``nu``, momentum traces) as trees shaped
    like the parameters, so the moments of an adapter's factors sit in :class:`jlora.LoraFactors`
    nodes wherever the optimizer put them: inside ``chain``, ``partition``, ``inject_hyperparams``
    or :func:`jlora.optim.lora_plus` states alike. Each ``a`` and ``b`` array found in such a node
    keeps its ``n - floor(ratio * n)`` largest entries by absolute value (exactly that many; ties
    go to the lower index) and the rest become zero. Everything else (step counts, the moments
    of plain parameters, schedule states) is returned as it is.

    **Adam and partial resets.** The moments are pruned independently (as in the authors' code),
    so an entry may keep its first moment ``mu`` while its second moment ``nu`` becomes zero;
    Adam's next step there is about ``mu / eps``. Right after a restart ``b = 0``, so ``a``
    gets zero gradients and such entries stay: in a small test (``tests/test_variants_relora.py``)
    Adam diverged after the third restart with ``ratio=0.9`` and ``0.99``, and trained well with
    ``ratio=1`` (a full reset, the default of the authors' code). The paper's warm restart of the
    learning rate does not bound this; prefer ``ratio=1`` unless you have checked otherwise.

    Args:
        opt_state: an optax state of an optimizer over a tree containing adapters.
        ratio: the fraction of each moment tensor to zero, in ``[0, 1]`` (the paper: 0.99;
            1 is a full reset of the factors' moments).

    Returns:
        ``opt_state`` with pruned factor moments (same structure, dtypes and shapes).

    Raises:
        ValueError: ``ratio`` is not in ``[0, 1]``, or the state holds no ``LoraFactors`` node
            (the optimizer was not initialised on adapters, or they were converted to dicts).

    Example:
        >>> import jax, jax.numpy as jnp, optax, jlora
        >>> from jlora.variants import reset_optimizer_state
        >>> f = jlora.LoraFactors(jnp.array([[1.0], [-4.0], [2.0], [0.5]]), jnp.ones((1, 2)), 1.0,
        ...                       jlora.Layout(1, 1))
        >>> tx = optax.sgd(1.0, momentum=0.9)
        >>> state = tx.update({"w": f}, tx.init({"w": f}))[1]
        >>> reset_optimizer_state(state, 0.5)[0].trace["w"].a[:, 0].tolist()
        [0.0, -4.0, 2.0, 0.0]
    """
    ratio = _check_ratio(ratio)
    found = []

    def prune(node: Any) -> Any:
        if not _is_factors(node):
            return node
        found.append(node)
        return dataclasses.replace(node, a=_prune(node.a, ratio), b=_prune(node.b, ratio))

    out = jax.tree_util.tree_map(prune, opt_state, is_leaf=_is_factors)
    if not found:
        raise ValueError(
            "reset_optimizer_state: the optimizer state holds no jlora.LoraFactors node, so there "
            "are no factor moments to prune; initialise the optimizer on the adapter tree from "
            "jlora.init (tx.init(adapters)), not on plain dicts or the base alone"
        )
    return out


def merge_and_reinit(
    key: jax.Array, params: Any, adapters: Any, config: LoraConfig
) -> tuple[Any, Any]:
    """One ReLoRA restart: folds the factors into the base and draws fresh ones.

    ``merge(params, adapters)`` (each merged weight on its base weight's sharding, rounded once
    to the base dtype) and ``init(key, merged, config)`` (``b = 0``: the adapted model's function
    is the merged model's, so training continues from where it was). Each new factor is put on
    the sharding of the factor it replaces.

    Args:
        key: a PRNG key for the new factors; use a different one at each restart.
        params: the base parameters.
        adapters: the trained adapters for ``params``.
        config: the config the adapters were made with.

    Returns:
        ``(merged_params, new_adapters)``; ``new_adapters`` has the structure of ``adapters``.

    Raises:
        AdapterMismatchError: as for :func:`jlora.merge`, or ``config`` targets other weights
            than ``adapters`` holds.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.variants import merge_and_reinit
        >>> params = {"w": jnp.zeros((3, 2))}
        >>> config = jlora.LoraConfig(targets="w", rank=1, alpha=1.0)
        >>> adapters = jax.tree.map(jnp.ones_like, jlora.init(jax.random.key(0), params, config))
        >>> params, adapters = merge_and_reinit(jax.random.key(1), params, adapters, config)
        >>> params["w"][0].tolist(), adapters["w"].b.tolist()
        ([1.0, 1.0], [[0.0, 0.0]])
    """
    _checks.prng_key(key, "merge_and_reinit: key")
    merged = _merge(params, adapters)
    fresh = _init(key, merged, config)
    old = dict(leaves_with_paths(adapters, is_leaf=_is_factors))
    new = dict(leaves_with_paths(fresh, is_leaf=_is_factors))
    if set(old) != set(new):
        odd = sorted(set(old) ^ set(new))
        raise AdapterMismatchError(
            f"{odd[0]}: config targets other weights than the adapters hold ({len(odd)} such "
            "paths); pass merge_and_reinit the LoraConfig the adapters were made with"
        )
    for path, f in new.items():
        g = old[path]
        if not isinstance(f, LoraFactors):
            continue
        found = (tuple(g.a.shape), tuple(g.b.shape), g.scale, g.layout)
        made = (tuple(f.a.shape), tuple(f.b.shape), f.scale, f.layout)
        if found != made:
            raise AdapterMismatchError(
                f"{path}: config makes factors a {made[0]}, b {made[1]}, scale {made[2]} but the "
                f"adapters hold a {found[0]}, b {found[1]}, scale {found[2]}; pass "
                "merge_and_reinit the LoraConfig the adapters were made with (same rank and alpha)"
            )
    return merged, jax.tree_util.tree_map(_onto, fresh, adapters)


def _onto(new: Any, old: Any) -> Any:
    sharding = getattr(old, "sharding", None)
    if sharding is None or isinstance(old, jax.core.Tracer) or isinstance(new, jax.core.Tracer):
        return new
    return new if getattr(new, "sharding", None) == sharding else jax.device_put(new, sharding)
