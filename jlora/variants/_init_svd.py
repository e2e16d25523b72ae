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
LoRA adapter over the *original* base, write the rank-``2r`` factors ``[a, a0]``, ``[b; -b0]``.

**LoRA-FA** (Zhang et al. 2023): ``a`` stays at its initial value and only ``b`` trains, so the
optimizer keeps moments for ``b`` alone (:func:`lora_fa`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .._config import LoraConfig
from .._factors import LoraFactors, with_extras
from .._merge import unmerge
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
