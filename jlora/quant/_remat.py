"""`remat`: recompute dequantised weights in the backward pass instead of keeping them.

``y = x dequantize(q)`` differentiated for ``x`` needs the dequantised weight again in the
backward pass; by default autodiff keeps it from the forward pass (a float copy of each weight,
alive until its layer's backward), which is the full-precision base QLoRA avoids. Every weight
jlora dequantises is tagged :data:`~jlora.quant.DEQUANTIZED`, so a checkpoint policy that saves
everything else recomputes just those from the stored codes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from ._weight import DEQUANTIZED


def remat(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` under ``jax.checkpoint`` that saves every residual but dequantised weights.

    Wrap the loss (or a layer) of a train step: activations are kept as without remat; each
    dequantised weight is recomputed from its codes where the backward pass needs it.

    Args:
        fn: a function whose computation dequantises weights (e.g. ``adapted.apply`` on a
            quantised base).

    Returns:
        The wrapped function, with the same signature and values.

    Example:
        >>> import jax, jax.numpy as jnp, jlora.quant
        >>> q = jlora.quant.quantize({"w": jnp.ones((64, 64))}, "w")["w"]
        >>> loss = jlora.quant.remat(lambda x, q: (x @ jlora.quant.QuantizedWeight.unbox(q)).sum())
        >>> jax.grad(loss)(jnp.ones((2, 64)), q).shape
        (2, 64)
    """
    policy = jax.checkpoint_policies.save_anything_except_these_names(DEQUANTIZED)
    return jax.checkpoint(fn, policy=policy)
