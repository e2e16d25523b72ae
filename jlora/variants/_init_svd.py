"""Initialisations from the base weight (PiSSA, OLoRA) and LoRA-FA's frozen ``a``.

With each weight in factor order ``W: (*stack, fan_in, fan_out)``:

* **PiSSA** (Meng et al. 2024): ``W = U S V^T``; ``a = U_r S_r^(1/2)``, ``b = S_r^(1/2) V_r^T``: the
  adapter starts on the principal singular directions (PEFT's ``init_lora_weights="pissa"``, exact
  SVD).
* **OLoRA** (Buyukakyuz 2024): the QR of the ``(fan_out, fan_in)`` transpose (PyTorch's weight),
  ``W^T = Q R``; ``a = R_r^T``, ``b = Q_r^T`` (PEFT's ``"olora"``).

Both return the *residual* base ``W - scale a b`` (by :func:`jlora.unmerge`: float32, rounded
once, on each weight's sharding) with the adapters, so ``residual + scale a b = W`` at init and the
model starts as the base. Use ``alpha = rank`` (scale 1) to make PiSSA's residual exactly the
minor singular part, as PEFT recommends. The factors train like any others; to export an ordinary
LoRA adapter over the *original* base (PEFT's ``path_initial_model_for_weight_conversion``),
:func:`residual_to_lora` writes the rank-``2r`` factors ``[a, a0]``, ``[b; -b0]``: their delta
``scale (a b - a0 b0)`` on ``W`` is ``residual + scale a b``.

**LoRA-FA** (Zhang et al. 2023): ``a`` stays at its initial value and only ``b`` trains, so the
optimizer keeps moments for ``b`` alone (:func:`lora_fa`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .._config import LoraConfig
from .._errors import AdapterMismatchError
from .._factors import LoraFactors, with_extras
from .._merge import adapter_tables, unboxed, unmerge
from .._paths import leaves_with_paths, nest
from .._targets import select
from ..optim import _check_optimizer, _partition, labels


def _factor_matrix(w: jax.Array, layout: Any) -> jax.Array:
    """``w`` as ``(*stack, prod(fan_in), prod(fan_out))`` in float32."""
    w = jnp.asarray(w).astype(jnp.float32)
    stack, fan_in, _ = layout.split(tuple(w.shape))  # roles of the weight's own order
    if layout.order:
        w = jnp.transpose(w, layout.to_factor_order(w.ndim))
    return w.reshape(*stack, math.prod(fan_in), -1)


def _pissa(w2: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    u, s, vt = jnp.linalg.svd(w2, full_matrices=False)
    root = jnp.sqrt(s[..., :r])
    return u[..., :, :r] * root[..., None, :], root[..., :, None] * vt[..., :r, :]


def _olora(w2: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    q, rr = jnp.linalg.qr(jnp.swapaxes(w2, -1, -2))  # (fan_out, k), (k, fan_in)
    return jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)


def _from_base(params: Any, config: LoraConfig, fn: Any) -> tuple[Any, Any]:
    weights = dict(leaves_with_paths(params))
    out = {}
    for t in select(params, config):
        w2 = _factor_matrix(weights[t.path], t.layout)
        a, b = jax.jit(fn, static_argnums=1)(w2, t.rank)
        a_shape, b_shape = t.layout.factor_shapes(t.shape, t.rank)
        out[t.path] = LoraFactors(
            a.reshape(a_shape).astype(config.dtype),
            b.reshape(b_shape).astype(config.dtype),
            t.scale,
            t.layout,
        )
    adapters = nest(out)
    return unmerge(params, adapters), with_extras(adapters, params, config)


def pissa_init(params: Any, config: LoraConfig) -> tuple[Any, Any]:
    """PiSSA: adapters on each weight's top-``r`` singular directions, and the residual base.

    Args:
        params: the base parameters (concrete arrays: the SVD reads their values).
        config: which weights to adapt, their ranks and scales (``alpha = rank`` recommended).

    Returns:
        ``(residual_params, adapters)`` with ``merge(residual_params, adapters)`` equal to
        ``params`` to float32 round-off.

    Raises:
        TargetError: as for :func:`jlora.init`.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.variants import pissa_init
        >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
        >>> residual, adapters = pissa_init(params, jlora.LoraConfig("w", rank=1, alpha=1.0))
        >>> residual["w"].diagonal().tolist(), jlora.delta(adapters)["w"].diagonal().tolist()
        ([0.0, 2.0, 1.0], [3.0, 0.0, 0.0])
    """
    return _from_base(params, config, _pissa)


def olora_init(params: Any, config: LoraConfig) -> tuple[Any, Any]:
    """OLoRA: adapters from the QR of each weight (``b`` orthonormal rows), and the residual base.

    Args:
        params: the base parameters (concrete arrays).
        config: which weights to adapt, their ranks and scales.

    Returns:
        ``(residual_params, adapters)`` with ``merge(residual_params, adapters)`` equal to
        ``params`` to float32 round-off.

    Raises:
        TargetError: as for :func:`jlora.init`.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.variants import olora_init
        >>> params = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])}
        >>> residual, adapters = olora_init(params, jlora.LoraConfig("w", rank=1, alpha=1.0))
        >>> abs(adapters["w"].b).tolist(), abs(residual["w"]).tolist()
        ([[1.0, 0.0]], [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    """
    return _from_base(params, config, _olora)


def lora_fa(optimizer: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """LoRA-FA: trains ``b`` (and trainable extras) with ``optimizer``; ``a`` and the base stay.

    ``optax.partition`` by :func:`jlora.optim.labels`: ``a`` and every leaf outside the adapters
    get ``optax.set_to_zero()`` (no state), so the optimizer state holds ``b``'s moments only.
    Works on the adapter tree alone or on a combined ``{'params': base, 'lora': adapters}``.

    Args:
        optimizer: the optimizer for ``b``.

    Returns:
        An optax transformation for trees that contain :class:`jlora.LoraFactors`.

    Raises:
        TypeError: ``optimizer`` is not an optax optimizer.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jlora
        >>> from jlora.variants import lora_fa
        >>> adapters = jlora.init(jax.random.key(0), {"w": jnp.ones((4, 3))},
        ...                       jlora.LoraConfig("w", rank=2))
        >>> tx = lora_fa(optax.sgd(0.5))
        >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, adapters), tx.init(adapters))
        >>> float(abs(updates["w"].a).max()), float(updates["w"].b[0, 0])
        (0.0, -0.5)
    """
    _check_optimizer(optimizer)
    return _partition(
        {"train": optimizer, "frozen": optax.set_to_zero()},
        lambda tree: labels(tree, a="frozen", b="train", other="frozen", trainable="train"),
    )


def residual_to_lora(initial: Any, adapters: Any, config: LoraConfig) -> tuple[Any, LoraConfig]:
    """Trained PiSSA / OLoRA adapters as an ordinary LoRA adapter over the *original* base.

    PiSSA and OLoRA train on the residual base ``W - scale a0 b0``; this gives the rank-``2r``
    factors ``a' = [a, a0]``, ``b' = [b; -b0]`` (same scale), so ``W + scale a' b' = (W - scale
    a0 b0) + scale a b``: :func:`jlora.merge` of the result onto the original parameters is the
    trained model (to round-off: the residual was rounded once), and :func:`jlora.peft.save` can
    write it with the returned config, as PEFT's ``path_initial_model_for_weight_conversion``
    does. Trainable extras pass through unchanged.

    Args:
        initial: the adapters :func:`pissa_init` / :func:`olora_init` returned (before training).
        adapters: the trained adapters (same paths, scales and layouts).
        config: the config both were made with.

    Returns:
        ``(lora_adapters, lora_config)``: rank ``2r`` per weight, ``alpha`` chosen so that each
        scale is unchanged (``2 alpha``, or ``sqrt(2) alpha`` with rsLoRA), as exact per-path
        ``rank_pattern`` / ``alpha_pattern`` entries.

    Raises:
        AdapterMismatchError: the two adapter trees differ in paths, shapes, scales or layouts.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.variants import pissa_init, residual_to_lora
        >>> params = {"w": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}
        >>> config = jlora.LoraConfig("w", rank=1, alpha=1.0)
        >>> residual, initial = pissa_init(params, config)
        >>> trained = jax.tree.map(lambda x: 2 * x, initial)  # stands for training
        >>> lora, lora_config = residual_to_lora(initial, trained, config)
        >>> lora["w"].rank, lora_config.scale_for("w")
        (2, 1.0)
        >>> jlora.merge(params, lora)["w"].diagonal().tolist()  # residual + 4 * 3 on the top one
        [12.0, 2.0, 1.0]
    """
    start, _ = adapter_tables(initial)
    table, extras = adapter_tables(adapters)
    if set(start) != set(table):
        raise AdapterMismatchError(
            f"residual_to_lora: the initial adapters cover {sorted(start)[:8]} but the trained "
            f"ones {sorted(table)[:8]}; pass the adapters pissa_init / olora_init returned and "
            "the same adapters after training"
        )
    out, ranks, alphas = {}, {}, {}
    for path, f in table.items():
        f0 = unboxed(start[path])
        same = f0.a.shape == f.a.shape and f0.b.shape == f.b.shape
        if not same or f0.scale != f.scale or f0.layout != f.layout:
            raise AdapterMismatchError(
                f"{path}: residual_to_lora: the initial adapter (a {tuple(f0.a.shape)}, b "
                f"{tuple(f0.b.shape)}, scale {f0.scale}, {f0.layout}) and the trained one (a "
                f"{tuple(f.a.shape)}, b {tuple(f.b.shape)}, scale {f.scale}, {f.layout}) differ; "
                "were they made with the same config?"
            )
        a = jnp.concatenate([f.a, f0.a.astype(f.a.dtype)], axis=-1)
        n_stack = f.a.ndim - 1 - f.layout.fan_in_ndim
        b = jnp.concatenate([f.b, -f0.b.astype(f.b.dtype)], axis=n_stack)
        out[path] = LoraFactors(a, b, f.scale, f.layout)
        rank = 2 * f.rank
        ranks[re.escape(path)] = rank
        alphas[re.escape(path)] = f.scale * (math.sqrt(rank) if config.use_rslora else rank)
    grow = math.sqrt(2.0) if config.use_rslora else 2.0
    lora_config = dataclasses.replace(
        config,
        rank=2 * config.rank,
        alpha=grow * config.alpha,
        rank_pattern=tuple(ranks.items()),
        alpha_pattern=tuple(alphas.items()),
    )
    return nest({**out, **extras}), lora_config
