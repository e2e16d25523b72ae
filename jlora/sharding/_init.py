"""Sharded ``init``: each factor drawn directly on its derived sharding."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from .._config import LoraConfig
from .._factors import draw, with_extras
from .._merge import factors_by_path
from .._targets import select
from ._specs import factor_shardings


def init(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    param_shardings: Any | None = None,
    *,
    mesh: Mesh | None = None,
) -> Any:
    """Like :func:`jlora.init`, but creates each factor directly on its sharding.

    Each factor is drawn by a jitted computation whose output is laid out by
    :func:`factor_shardings`: no host round trip and no full replica of anything.

    Args:
        key: a PRNG key.
        params: the base params: sharded arrays, or abstract leaves when ``param_shardings`` is given.
        config: which weights to adapt and how.
        param_shardings: a pytree like ``params`` of NamedShardings (or, with ``mesh``,
            PartitionSpecs); by default each array's own ``.sharding``.
        mesh: the mesh for PartitionSpec leaves of ``param_shardings``.

    Returns:
        The adapter pytree, equal to ``jlora.init(key, params, config)``, sharded (trainable
        extras are copies of the base leaves, on their shardings).

    Raises:
        AdapterMismatchError: as for :func:`factor_shardings`.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jlora
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
        >>> w = jax.device_put(jnp.zeros((8, 32)), NamedSharding(mesh, P("data", "model")))
        >>> adapters = init(jax.random.key(0), {"w": w}, jlora.LoraConfig(targets="w"))
        >>> tuple(adapters["w"].a.sharding.spec), tuple(adapters["w"].b.sharding.spec)
        (('data', None), (None, 'model'))
    """
    if param_shardings is None:
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
    targets = select(params, config)
    abstract = jax.eval_shape(lambda k: draw(k, targets, config), key)
    shardings = factor_shardings(abstract, param_shardings, mesh)
    table = {path: (f.a, f.b) for path, f in factors_by_path(shardings).items()}
    return with_extras(draw(key, targets, config, shardings=table), params, config)
