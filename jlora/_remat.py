"""`remat_policy`: a checkpoint policy that recomputes what LoRA adds to a frozen model's memory.

A LoRA step keeps, besides what the frozen model's backward pass keeps, each adapter's input (a
LayerNorm's, the attention's or the GELU's output) for the gradient of ``a``. Recomputing those
inputs in the backward pass brings the step's memory below the frozen-base step's, if two things
hold:

- **The recomputation is ordered.** jax keeps a rematerialised block's recomputation in the
  backward pass with ``optimization_barrier``; XLA:CPU removes those barriers before scheduling,
  so per-block ``nn.remat`` in a Python loop of blocks left the peak where it was (measured in
  ``benchmarks/results/remat-memory-cpu.md``). The body of a loop, ``nn.scan`` over the blocks,
  is recomputed in the backward loop, one block at a time, on every backend.
- **The policy saves the frozen model's products and nothing of the adapters'.** jax's
  ``dots_with_no_batch_dims_saveable`` also saves each adapter's ``(x a) b``, a full
  ``(rows, fan_out)`` activation per adapted projection; recomputing it from the saved ``x a`` is
  ``O(r)`` per element. This policy saves a product only where it contracts over more than
  ``max_rank`` elements, so the base's projections (and each adapter's small ``x a``) are kept
  and every elementwise op, attention's batched products and the adapters' ``(x a) b`` are
  recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from ._errors import ConfigError

__all__ = ["remat_policy"]


def remat_policy(max_rank: int = 64) -> Callable[..., bool]:
    """A ``jax.checkpoint`` policy: save the frozen model's products, recompute LoRA's extras.

    Use it on every block, with the blocks under ``nn.scan`` (Linen) or ``nnx.scan`` (NNX), so that
    the loop orders the recomputation (see the module docstring): the step's values and gradients
    are those of the same scanned model without remat (the recomputation runs the same
    operations), and its memory falls below the frozen base's step at the cost of recomputing the
    blocks' elementwise ops, attention's batched products and the adapters' rank-``r`` products.
    On the benchmark decoder (XLA:CPU, d512, 4 layers, all six linears, r=8) the step took 0.86x the
    frozen step's memory at 1.07-1.19x its time over two runs
    (``benchmarks/results/remat-memory-cpu.md``).

    Saved: outputs of ``dot_general`` without batch axes whose contraction is larger than
    ``max_rank`` (the base's projections and each adapter's ``x a``). Everything else, including
    the values named ``jlora.ops.LORA_INPUT``, is recomputed.

    Args:
        max_rank: products that contract over at most this many elements are recomputed; set it
            to at least the adapters' largest rank and below the model's smallest fan-in.

    Returns:
        A policy for ``jax.checkpoint(..., policy=)``, ``nn.remat(..., policy=)`` or
        ``nnx.remat(..., policy=)``.

    Raises:
        ConfigError: ``max_rank`` is not a positive integer.

    Example:
        A base product ``x w`` (contracting 128) and an adapter's ``x a`` are kept; ``(x a) b``
        (contracting 4) and the ``sin`` are recomputed, to the same gradient:

        >>> import jax, jax.numpy as jnp, jlora
        >>> loss = lambda a, x, w, b: jnp.sin(x @ w + (x @ a) @ b).sum()
        >>> f = jax.checkpoint(loss, policy=jlora.remat_policy())
        >>> args = jnp.ones((128, 4)), jnp.ones((2, 128)), jnp.eye(128), jnp.ones((4, 128))
        >>> bool((jax.grad(f)(*args) == jax.grad(loss)(*args)).all())
        True

        In a model: ``nn.scan(nn.remat(Block, policy=jlora.remat_policy()), variable_axes=
        {"params": 0}, split_rngs={"params": True}, length=layers)``.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ConfigError(
            f"remat_policy: max_rank is {max_rank!r}; expected a positive int, at least the "
            "adapters' largest rank (e.g. jlora.remat_policy(max_rank=64))"
        )

    def policy(prim: Any, *avals: Any, **params: Any) -> bool:
        if prim is not jax.lax.dot_general_p:
            return False
        (lhs_contract, _), (lhs_batch, rhs_batch) = params["dimension_numbers"]
        if lhs_batch or rhs_batch:
            return False
        return math.prod(avals[0].shape[d] for d in lhs_contract) > max_rank

    return policy
