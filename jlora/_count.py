"""Counting trainable and total parameters.

For LoRA on ``L`` weight matrices of shape ``d_model x d_model`` the trainable count is
``|Theta| = 2 * L * d_model * r`` (Hu et al. 2022, section 4): each adapter holds ``d_model * r`` in
``a`` and ``r * d_model`` in ``b``.

Trainable extras (:class:`jlora.Trainable`, e.g. a classifier head) count as trainable; since each
replaces a base leaf of the same size, the adapted model's total counts them once. DoRA's
magnitudes (``magnitudes=``, one per output unit of each DoRA weight) count as trainable too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from . import _checks
from ._extras import is_trainable
from ._merge import adapter_tables


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a base model and its adapters.

    Attributes:
        trainable: number of trainable parameters: the factors, the extras and any DoRA
            magnitudes.
        base: number of frozen base parameters.
        extras: how many of ``trainable`` are trainable extras (fully trained copies of base
            leaves, which replace those leaves).
    """

    trainable: int
    base: int
    extras: int = 0

    @property
    def total(self) -> int:
        """Parameters of the adapted model: base plus factors (an extra replaces its base leaf)."""
        return self.base + self.trainable - self.extras

    @property
    def fraction(self) -> float:
        """``trainable / total``."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        extras = f" (extras: {self.extras:,})" if self.extras else ""
        return (
            f"trainable params: {self.trainable:,}{extras} || all params: {self.total:,} || "
            f"trainable: {100 * self.fraction:.4f}%"
        )


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def count_params(params: Any, adapters: Any, *, magnitudes: Any | None = None) -> ParamCount:
    """Counts the trainable (adapter) and frozen (base) parameters.

    Args:
        params: the base parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
        adapters: its adapter pytree; its trainable extras count as trainable, and separately
            in ``ParamCount.extras``.
        magnitudes: DoRA's magnitudes ``{path: m}`` for these adapters
            (:func:`jlora.variants.dora_magnitudes`), counted as trainable.

    Returns:
        A :class:`ParamCount`; ``str()`` of it is a one-line summary.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": jnp.ones((100, 100))}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=4))
        >>> print(count_params(params, adapters))
        trainable params: 800 || all params: 10,800 || trainable: 7.4074%
        >>> params["head"] = jnp.ones((100, 2))
        >>> config = jlora.LoraConfig(targets="w", rank=4, trainable=("head",))
        >>> print(count_params(params, jlora.init(jax.random.key(0), params, config)))
        trainable params: 1,000 (extras: 200) || all params: 11,000 || trainable: 9.0909%
        >>> from jlora.variants import dora_magnitudes
        >>> print(count_params(params, adapters, magnitudes=dora_magnitudes(params, adapters)))
        trainable params: 900 || all params: 11,100 || trainable: 8.1081%

    Raises:
        AdapterMismatchError: a magnitude has no factors at its path or does not fit them.
    """
    _checks.adapters_given(adapters)
    if params is None:
        raise TypeError(
            "params: got None; expected the base parameter tree the adapters were made for"
        )
    nodes = jax.tree_util.tree_leaves(adapters, is_leaf=is_trainable)
    extras = sum(_size(n) for n in nodes if is_trainable(n))
    from .checkpoint._magnitudes import check  # the package imports this module

    dora = sum(_size(m) for m in check(magnitudes, adapter_tables(adapters)[0]).values())
    return ParamCount(trainable=_size(adapters) + dora, base=_size(params), extras=extras)
