"""LoRA dropout (Hu et al. 2022): inverted dropout on the adapter's input, from a packed keep mask.

The mask itself (16 random bits per element, four elements per hash) is :mod:`jlora._mask`'s; this
module checks the rate and the key and applies the mask with the inverted scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks, _mask
from .._errors import MissingRngError

def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout: zeros each entry with probability ``rate``, scales the rest by ``1/(1-rate)``.

    Each entry is an independent Bernoulli draw from 16 random bits (four entries per Threefry
    hash), so it is kept with probability ``1 - rate`` rounded to a multiple of ``2**-16``
    (``58982/65536`` for 0.1; exact for 0.5), and a kept entry is exactly ``x * (1 / (1 - rate))``
    with the factor rounded to ``x``'s dtype. The mask is a function of ``rng`` and ``x``'s shape
    only: the same on every backend and in the backward pass, and it is never drawn twice.

    Args:
        x: the adapter's input.
        rate: drop probability in ``[0, 1)``; 0 returns ``x`` itself.
        rng: a PRNG key, required when ``rate > 0``.

    Raises:
        MissingRngError: ``rate > 0`` and ``rng`` is None.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> y = dropout(jnp.ones(1000), 0.5, jax.random.key(0))
        >>> sorted(set(y.tolist()))
        [0.0, 2.0]
    """
    if not isinstance(rate, jax.core.Tracer) and not _is_rate(rate):
        raise ValueError(
            f"LoRA dropout rate {rate!r} is invalid; expected a number in [0, 1) (0 turns "
            "dropout off)"
        )
    if rate == 0.0:
        return x
    if rng is None:
        raise MissingRngError(
            f"LoRA dropout rate is {rate} but no PRNG key was given; pass rng= (in Flax: a "
            "'dropout' rng stream) for training, or dropout=0 / deterministic mode for evaluation"
        )
    _checks.prng_key(rng, "rng")
    keep = _mask.keep_mask(rng, rate, x.shape)
    # XLA turns a division by a constant into this product anyway; written out, it is exactly
    # x * fl(1 / (1 - rate)) in x's dtype on every backend.
    scale = jnp.asarray(1.0 / (1.0 - rate), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def _is_rate(rate: object) -> bool:
    if isinstance(rate, bool | np.bool_ | str | bytes) or np.ndim(rate) != 0:
        return False
    try:
        return np.isrealobj(rate) and 0.0 <= float(rate) < 1.0
    except (TypeError, ValueError):
        return False
