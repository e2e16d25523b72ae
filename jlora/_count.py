"""Counting trainable and total parameters.

For LoRA on ``L`` weight matrices of shape ``d_model x d_model`` the trainable count is
``|Theta| = 2 * L * d_model * r`` (Hu et al. 2022, section 4): each adapter holds ``d_model * r`` in
``a`` and ``r * d_model`` in ``b``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a base model and its adapters.

    Attributes:
        trainable: number of adapter parameters.
        base: number of frozen base parameters.
    """

    trainable: int
    base: int

    @property
    def total(self) -> int:
        """Base plus adapter parameters."""
        return self.base + self.trainable

    @property
    def fraction(self) -> float:
        """``trainable / total``."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable: {100 * self.fraction:.4f}%"
        )


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def count_params(params: Any, adapters: Any) -> ParamCount:
    """Counts the trainable (adapter) and frozen (base) parameters.

    Args:
        params: the base parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
        adapters: its adapter pytree.

    Returns:
        A :class:`ParamCount`; ``str()`` of it is a one-line summary.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": jnp.ones((100, 100))}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=4))
        >>> print(count_params(params, adapters))
        trainable params: 800 || all params: 10,800 || trainable: 7.4074%
    """
    return ParamCount(trainable=_size(adapters), base=_size(params))
