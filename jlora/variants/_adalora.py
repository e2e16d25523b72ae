"""AdaLoRA (Zhang et al. 2023): an SVD-form adapter whose rank per weight is set by importance.

Each weight ``W0: (*stack, *fan_in, *fan_out)`` (factor order) gets ``delta = scale p diag(lam) q``
with ``p: (*stack, *fan_in, r)``, ``q: (*stack, r, *fan_out)`` ``~ N(0, 0.02^2)`` and ``lam = 0:
(*stack, r)`` (so ``delta = 0`` exactly at init). The loss adds the orthogonality regulariser
``R = sum_w ||p^T p - I||_F^2 + ||q q^T - I||_F^2`` (:func:`adalora_orth`). Each entry ``w`` has
sensitivity ``I = |w dL/dw|``, smoothed as ``Ibar <- b1 Ibar + (1 - b1) I``, ``Ubar <- b2 Ubar +
(1 - b2) |I - Ibar|`` (with the new ``Ibar``, as PEFT), ``s(w) = Ibar Ubar``; triplet ``i``
scores ``s(lam_i) + mean_j s(p_ji) + mean_j s(q_ij)``. The total rank follows the cubic schedule
:func:`adalora_budget`; :func:`adalora_mask` zeroes each ``lam`` outside the top-``b(t)`` scores
over all weights (masked triplets still train, and may come back at the next masking).
:func:`adalora_to_lora` gives plain :class:`jlora.LoraFactors` (``a = p diag(lam)``, ``b = q``).

The loop is the user's: loss ``task(merge(params, adalora_to_lora(ada, drop_masked=False))) +
gamma adalora_orth(ada)``; after each optax step ``adalora_update_importance``; every ``delta_T``
steps in ``[t_i, T - t_f)`` and every step after, ``adalora_mask(ada, state, adalora_budget(t))``.

**In the Flax transforms** the triplets need no layer of their own: ``adalora_to_lora(ada,
drop_masked=False)`` is traceable and differentiable, and gives the plain factors the transforms
take, so the same loop runs on an unmodified model (``tests/test_variants_adalora_flax.py``):

* ``jlora.linen``: the loss calls ``adapted.apply(params, adalora_to_lora(ada,
  drop_masked=False), x)``; ``adalora_init`` takes the params (``LoraConfig.layouts`` from
  ``adapted.infer_layouts`` for multi-axis kernels).
* ``jlora.nnx``: adapt the model with the same config, ``graphdef, _, rest = nnx.split(model,
  jlora.nnx.LoraParam, ...)``, and call ``nnx.merge(graphdef, jlora.nnx.to_state(model,
  adalora_to_lora(ada, drop_masked=False)), rest)(x)`` in the loss; ``jlora.nnx.set_adapters(model,
  adalora_to_lora(ada))`` loads the result.

The optimizer (optax) holds the triplets, not ``nnx.Optimizer``. At the end ``adalora_to_lora(ada)``
is ordinary LoRA (merge, checkpoints, PEFT files), of rank :func:`adalora_ranks` per weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._config import LoraConfig
from .._factors import LoraFactors, _path_key
from .._layout import Layout
from .._paths import leaves_with_paths, nest
from .._targets import select


@dataclasses.dataclass(frozen=True)
class AdaloraFactors:
    """One weight's AdaLoRA triplets: ``p``, ``lam``, ``q`` (leaves), static ``scale``, ``layout``.

    Attributes:
        p: ``(*stack, *fan_in, r)``, the left singular vectors.
        lam: ``(*stack, r)``, the singular values (0 where masked).
        q: ``(*stack, r, *fan_out)``, the right singular vectors.
        scale: ``alpha / r`` of the config.
        layout: the weight's fan-in/fan-out structure.
    """

    p: jax.Array
    lam: jax.Array
    q: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})
    layout: Layout = dataclasses.field(metadata={"static": True})


jax.tree_util.register_dataclass(AdaloraFactors)


def _is_ada(x: Any) -> bool:
    return isinstance(x, AdaloraFactors)


def _table(adapters: Any) -> dict[str, AdaloraFactors]:
    return {p: f for p, f in leaves_with_paths(adapters, is_leaf=_is_ada) if _is_ada(f)}


def adalora_init(key: jax.Array, params: Any, config: LoraConfig, *, std: float = 0.02) -> Any:
    """AdaLoRA triplets for the weights ``config`` selects: ``p, q ~ N(0, std^2)``, ``lam = 0``.

    Args:
        key: PRNG key (one key per path is folded from it).
        params: the base parameters (shapes and dtypes are read).
        config: targets, initial rank ``r`` (the budget ``b0`` is the sum of ranks) and scale.
        std: standard deviation of ``p`` and ``q`` (PEFT: 0.02).

    Returns:
        The adapter tree, an :class:`AdaloraFactors` at each target's path (``config.dtype``).

    Raises:
        TargetError: as for :func:`jlora.init`.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> config = jlora.LoraConfig("w", rank=2)
        >>> ada = adalora_init(jax.random.key(0), {"w": jnp.ones((4, 3))}, config)
        >>> ada["w"].p.shape, ada["w"].lam.tolist(), ada["w"].q.shape
        ((4, 2), [0.0, 0.0], (2, 3))
    """
    out = {}
    for t in select(params, config):
        a_shape, b_shape = t.layout.factor_shapes(t.shape, t.rank)
        kp, kq = jax.random.split(_path_key(key, t.path))
        stack = a_shape[: t.layout.stack_ndim(t.shape)]
        out[t.path] = AdaloraFactors(
            (std * jax.random.normal(kp, a_shape, jnp.float32)).astype(config.dtype),
            jnp.zeros((*stack, t.rank), config.dtype),
            (std * jax.random.normal(kq, b_shape, jnp.float32)).astype(config.dtype),
            t.scale,
            t.layout,
        )
    return nest(out)


def _matrices(f: AdaloraFactors) -> tuple[jax.Array, jax.Array]:
    """``p: (*stack, fan_in, r)`` and ``q: (*stack, r, fan_out)`` with fan axes flattened."""
    n_stack = f.lam.ndim - 1
    return f.p.reshape(*f.p.shape[:n_stack], -1, f.p.shape[-1]), f.q.reshape(
        *f.q.shape[: n_stack + 1], -1
    )


def adalora_orth(adapters: Any) -> jax.Array:
    """The orthogonality regulariser ``sum ||p^T p - I||_F^2 + ||q q^T - I||_F^2`` (float32).

    Summed over weights and stack slices (PEFT averages unsquared norms over weights).

    Example:
        >>> import jax.numpy as jnp; from jlora import Layout
        >>> f = AdaloraFactors(jnp.eye(3, 2), jnp.zeros(2), 2 * jnp.eye(2, 4), 1.0, Layout(1, 1))
        >>> float(adalora_orth({"w": f}))  # q q^T = 4 I: (4 - 1)^2 twice
        18.0
    """
    total = jnp.zeros((), jnp.float32)
    for f in _table(adapters).values():
        p, q = (m.astype(jnp.float32) for m in _matrices(f))
        eye = jnp.broadcast_to(jnp.eye(p.shape[-1], dtype=jnp.float32), (*f.lam.shape, p.shape[-1]))
        total += jnp.sum(jnp.square(jnp.swapaxes(p, -1, -2) @ p - eye))
        total += jnp.sum(jnp.square(q @ jnp.swapaxes(q, -1, -2) - eye))
    return total


def adalora_to_lora(adapters: Any, *, drop_masked: bool = True) -> Any:
    """The adapters as plain LoRA: ``a = p diag(lam)``, ``b = q``, same scale and layout.

    Args:
        adapters: a tree of :class:`AdaloraFactors`.
        drop_masked: drop the triplets whose ``lam`` is 0 in every stack slice, so the rank is the
            kept count (reads values: not inside ``jit``), and a weight that keeps none (its
            delta is 0) is left out of the tree. ``False`` keeps all ``r`` (traceable).

    Returns:
        The same tree with :class:`jlora.LoraFactors` in place of each :class:`AdaloraFactors`;
        ``jlora.merge(params, adalora_to_lora(ada))`` is ``W0 + scale p diag(lam) q`` either way.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = AdaloraFactors(jnp.ones((3, 2)), jnp.array([0.0, 2.0]), jnp.ones((2, 4)), 1.0,
        ...                    jlora.Layout(1, 1))
        >>> lora = adalora_to_lora({"w": f})
        >>> lora["w"].rank, adalora_ranks({"w": f}), float(jlora.delta(lora)["w"][0, 0])
        (1, {'w': 1}, 2.0)
    """

    def one(f: AdaloraFactors) -> LoraFactors:
        lam = f.lam.reshape(*f.lam.shape[:-1], *([1] * (f.p.ndim - f.lam.ndim)), f.lam.shape[-1])
        a, b = f.p * lam, f.q
        if drop_masked:
            keep = np.flatnonzero(np.any(np.asarray(f.lam) != 0, axis=tuple(range(f.lam.ndim - 1))))
            if keep.size == 0:
                return None  # nothing kept: no adapter (a rank-0 one merges to nothing anyway)
            a = jnp.take(a, keep, axis=a.ndim - 1)
            b = jnp.take(b, keep, axis=f.lam.ndim - 1)
        return LoraFactors(a, b, f.scale, f.layout)

    out = jax.tree.map(lambda f: one(f) if _is_ada(f) else f, adapters, is_leaf=_is_ada)
    return _pruned(out) if drop_masked else out


def _pruned(tree: Any) -> Any:
    """``tree`` without the dict entries that are None or became empty dicts."""
    if not isinstance(tree, dict):
        return tree
    out = {k: _pruned(v) for k, v in tree.items() if v is not None}
    return {k: v for k, v in out.items() if v != {}}


def adalora_ranks(adapters: Any) -> dict[str, Any]:
    """The kept rank (nonzero ``lam`` count) per weight path: an int, or an array per stack slice.

    Example: see :func:`adalora_to_lora`.
    """
    out = {}
    for path, f in _table(adapters).items():
        counts = np.count_nonzero(np.asarray(f.lam), axis=-1)
        out[path] = int(counts) if counts.ndim == 0 else counts
    return out


def adalora_total_rank(adapters: Any) -> int:
    """``b0``: the total number of triplets (``r`` summed over weights and stack slices)."""
    return sum(math.prod(f.lam.shape) for f in _table(adapters).values())
