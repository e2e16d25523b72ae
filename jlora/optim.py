"""optax helpers: the LoRA+ learning-rate ratio, and labels/masks for one combined tree.

**LoRA+** (Hayou, Ghosh and Yu 2024) trains ``b`` (the factor that maps into the layer's output,
initialised to zero) with a learning rate ``ratio`` times that of ``a``; the paper's default ratio
is 16. :func:`lora_plus` appends :func:`scale_by_lora_plus` to any optimizer, which multiplies the
``b`` updates by ``ratio`` *after* the optimizer. For an optimizer whose update is

    u_t = -lr_t * d_t,  with d_t independent of lr

(the learning rate, or schedule, is a final multiplication), this equals running the same optimizer
with learning rate ``ratio * lr_t`` on ``b``: exactly for ``optax.sgd`` (with or without momentum
or Nesterov), ``adam``, ``adamw`` (decoupled weight decay is inside ``d_t``), ``nadam``,
``adamax``, ``amsgrad``, ``adabelief``, ``radam``, ``yogi``, ``novograd``, ``lion``, ``rmsprop``,
``adagrad``, ``adafactor``, ``lamb``, ``lars``, ``sm3``, and chains that clip or accumulate
gradients *before* the optimizer (``clip_by_global_norm``, ``optax.MultiSteps``), each with any
schedule. It is not exact where the learning rate enters the optimizer's state or is followed by
a non-linear step: schedule-free and learning-rate-free optimizers (``optax.contrib``'s
``schedule_free_*``, ``prodigy``, ``dadapt_*``, ``mechanize``), ``polyak_sgd``, lookahead or SAM
wrappers, and anything that clips the *updates* after the optimizer. For those, give ``b`` its own
optimizer with :func:`labels` and ``optax.partition``.

**One combined tree.** Keeping the frozen base and the adapters as separate arguments needs no
masks (``jax.grad(loss)(adapters, base, ...)``). Users who keep one tree (``{'params': base,
'lora': adapters}``, or any tree that contains :class:`jlora.LoraFactors`) can label it:
every leaf inside a ``LoraFactors`` node is a factor, every leaf inside a :class:`jlora.Trainable`
node (a trainable extra, e.g. a classifier head from ``LoraConfig.trainable``) trains as a plain
parameter, every other leaf is frozen, and :func:`freeze_base` gives ``optax.set_to_zero()`` (which
has no state) to the frozen part. LoRA+ scales ``b`` alone: extras train at the optimizer's rate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
import optax

from . import _checks
from ._extras import Trainable
from ._factors import LoraFactors

__all__ = ["freeze_base", "labels", "lora_plus", "mask", "scale_by_lora_plus"]

_DEFAULT_RATIO = 16.0
# `optax.partition` is the newer name of `optax.multi_transform` (same function).
_partition = getattr(optax, "partition", None) or optax.multi_transform


def _is_factors(x: Any) -> bool:
    return isinstance(x, LoraFactors)


def _is_node(x: Any) -> bool:
    return isinstance(x, (LoraFactors, Trainable))


def _check_ratio(ratio: Any) -> float:
    real = not isinstance(ratio, (bool, np.bool_)) and isinstance(
        ratio, (int, float, np.integer, np.floating)
    )
    if not real or not (0 < ratio < math.inf):
        raise ValueError(
            f"LoRA+ ratio {ratio!r} is invalid; expected a number > 0 and finite, the learning rate "
            "of b relative to a (the paper's default is 16)"
        )
    return float(ratio)


def scale_by_lora_plus(ratio: float = _DEFAULT_RATIO) -> optax.GradientTransformation:
    """Multiplies the ``b`` updates of every :class:`jlora.LoraFactors` by ``ratio``.

    Put it after an optimizer (``optax.chain(optimizer, scale_by_lora_plus(16.0))``, which is what
    :func:`lora_plus` does) to give ``b`` a learning rate ``ratio`` times that of ``a``. Leaves
    outside ``LoraFactors`` nodes, and ``b`` slots another wrapper has masked out, pass through.
    The module docstring lists the optimizers for which this is exact.

    Args:
        ratio: ``lr_b / lr_a``, a number > 0.

    Returns:
        A stateless ``optax.GradientTransformation``.

    Raises:
        ValueError: ``ratio`` is not a finite positive number.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.optim import scale_by_lora_plus
        >>> g = {"w": jlora.LoraFactors(jnp.ones((3, 1)), jnp.ones((1, 2)), 1.0, jlora.Layout(1, 1))}
        >>> tx = scale_by_lora_plus(16.0)
        >>> updates, _ = tx.update(g, tx.init(g))
        >>> float(updates["w"].a[0, 0]), float(updates["w"].b[0, 0])
        (1.0, 16.0)
    """
    ratio = _check_ratio(ratio)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def scale(node: Any) -> Any:
        if not _is_factors(node) or not hasattr(node.b, "dtype"):
            return node
        # A Python float is weakly typed: the product keeps b's dtype under strict promotion.
        return dataclasses.replace(node, b=node.b * ratio)

    def update_fn(
        updates: Any, state: optax.EmptyState, params: Any = None
    ) -> tuple[Any, optax.EmptyState]:
        del params
        return jax.tree_util.tree_map(scale, updates, is_leaf=_is_factors), state

    return optax.GradientTransformation(init_fn, update_fn)


def lora_plus(
    optimizer: optax.GradientTransformation, ratio: float = _DEFAULT_RATIO
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` with LoRA+: ``b`` learns ``ratio`` times faster than ``a``.

    ``lora_plus(optax.adamw(schedule), 16.0)`` updates ``a`` exactly as ``optax.adamw(schedule)``
    would and ``b`` exactly as ``optax.adamw(lambda t: 16.0 * schedule(t))`` would (see the module
    docstring for the optimizers where this identity holds).

    Args:
        optimizer: any optax optimizer, with a constant learning rate or a schedule.
        ratio: ``lr_b / lr_a``; 16 by default (Hayou et al. 2024).

    Returns:
        ``optax.chain(optimizer, scale_by_lora_plus(ratio))``; its state is the optimizer's.

    Raises:
        ValueError: ``ratio`` is not a positive number.
        TypeError: ``optimizer`` is not an optax optimizer (e.g. ``optax.adam`` uncalled).

    Example:
        >>> import jax, jax.numpy as jnp, optax, jlora
        >>> from jlora.optim import lora_plus
        >>> params = {"w": jnp.ones((4, 3))}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=2))
        >>> tx = lora_plus(optax.sgd(0.5), ratio=16.0)
        >>> grads = jax.tree.map(jnp.ones_like, adapters)
        >>> updates, _ = tx.update(grads, tx.init(adapters))
        >>> float(updates["w"].a[0, 0]), float(updates["w"].b[0, 0])
        (-0.5, -8.0)
    """
    _check_optimizer(optimizer)
    return optax.chain(optimizer, scale_by_lora_plus(ratio))


def _check_optimizer(optimizer: Any) -> None:
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            f"optimizer: got {_checks.found(optimizer)}; expected an optax.GradientTransformation, "
            "e.g. optax.adamw(1e-3) (an optimizer made by calling optax.adamw, not the function)"
        )


def _checked_factor_count(tree: Any, caller: str) -> None:
    nodes = jax.tree_util.tree_leaves(tree, is_leaf=_is_node)
    if not any(_is_node(n) for n in nodes):
        raise ValueError(
            f"jlora.optim.{caller}: the tree holds no jlora.LoraFactors, so every leaf would be "
            "frozen and nothing would train (nor any jlora.Trainable extra). Pass the tree that "
            "contains the adapters (e.g. "
            "{'params': base, 'lora': adapters} with adapters from jlora.init), not the base alone "
            "or adapters converted to plain dicts"
        )


def labels(
    tree: Any,
    *,
    a: str = "lora",
    b: str = "lora",
    other: str = "frozen",
    trainable: str = "lora",
) -> Any:
    """Labels every leaf of a combined tree for ``optax.partition``.

    Leaves inside a :class:`jlora.LoraFactors` node get ``a`` or ``b``; the value of each
    :class:`jlora.Trainable` node (a trainable extra) gets ``trainable``; all other leaves get
    ``other``. The result has the tree's structure (labels sit in ``LoraFactors`` and
    ``Trainable`` nodes), as ``optax.partition`` requires. Use distinct ``a`` and ``b`` labels to
    give ``b`` an optimizer of its own (LoRA+ for optimizers :func:`lora_plus` cannot scale
    exactly), and a distinct ``trainable`` label to give the extras theirs.

    Args:
        tree: a pytree containing adapters (arrays or ``jax.ShapeDtypeStruct`` leaves).
        a: label of the ``a`` factors.
        b: label of the ``b`` factors.
        other: label of every other leaf (the frozen base).
        trainable: label of the trainable extras (trained in full, like the factors by default).

    Returns:
        A pytree of strings with the structure of ``tree``.

    Raises:
        ValueError: the tree holds no ``LoraFactors`` or ``Trainable`` (nothing would train).

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.optim import labels
        >>> base = {"w": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
        >>> config = jlora.LoraConfig(targets="w", rank=2, trainable=("bias",))
        >>> adapters = jlora.init(jax.random.key(0), base, config)
        >>> tags = labels({"params": base, "lora": adapters}, trainable="head")
        >>> tags["params"]["bias"], tags["lora"]["w"].a, tags["lora"]["w"].b, tags["lora"]["bias"]
        ('frozen', 'lora', 'lora', Trainable(value='head'))
    """
    _checked_factor_count(tree, "labels")

    def label(node: Any) -> Any:
        if _is_factors(node):
            return dataclasses.replace(node, a=a, b=b)
        if isinstance(node, Trainable):
            return Trainable(trainable)
        return other

    return jax.tree_util.tree_map(label, tree, is_leaf=_is_node)


def mask(tree: Any, *, invert: bool = False) -> Any:
    """``True`` at every factor and extra of a combined tree, ``False`` elsewhere (``optax.masked``).

    ``optax.masked(inner, mask)`` runs ``inner`` on the ``True`` leaves and passes the others
    through *unchanged* (gradients stay gradients), so freezing needs the inverted mask:
    ``optax.masked(optax.set_to_zero(), mask(tree, invert=True))`` zeroes the base's updates.

    Args:
        tree: a pytree containing adapters.
        invert: mark the frozen leaves (the base) instead.

    Returns:
        A pytree of bools with the structure of ``tree``.

    Raises:
        ValueError: the tree holds no ``LoraFactors`` or ``Trainable``.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.optim import mask
        >>> base = {"w": jnp.ones((4, 3))}
        >>> adapters = jlora.init(jax.random.key(0), base, jlora.LoraConfig(targets="w", rank=2))
        >>> jax.tree.leaves(mask({"params": base, "lora": adapters}))
        [True, True, False]
    """
    _checked_factor_count(tree, "mask")
    tags = labels(tree, a="factor", b="factor", other="base", trainable="factor")
    return jax.tree_util.tree_map(lambda tag: (tag == "factor") != invert, tags)


def freeze_base(optimizer: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Trains the factors and extras of a combined tree with ``optimizer``, freezes everything else.

    ``optax.partition({'lora': optimizer, 'frozen': optax.set_to_zero()}, labels)``: the base gets
    zero updates and ``set_to_zero`` keeps no state, so the optimizer state holds factors and
    trainable extras (:class:`jlora.Trainable`) only and ``optax.apply_updates`` leaves the base
    bit-identical. The base's *gradient* is still computed
    if you differentiate the combined tree; to skip that cost, pass the base as its own argument
    (or wrap it in ``jax.lax.stop_gradient``).

    Args:
        optimizer: the optimizer for the factors (``lora_plus(...)`` works too).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` for trees that contain ``LoraFactors`` (or
        ``Trainable`` extras).

    Example:
        >>> import jax, jax.numpy as jnp, optax, jlora
        >>> from jlora.optim import freeze_base
        >>> base = {"w": jnp.ones((4, 3))}
        >>> adapters = jlora.init(jax.random.key(0), base, jlora.LoraConfig(targets="w", rank=2))
        >>> tree = {"params": base, "lora": adapters}
        >>> tx = freeze_base(optax.sgd(0.5))
        >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
        >>> float(abs(updates["params"]["w"]).max()), float(updates["lora"]["w"].a[0, 0])
        (0.0, -0.5)
    """
    _check_optimizer(optimizer)
    return _partition(
        {"lora": optimizer, "frozen": optax.set_to_zero()},
        lambda tree: labels(tree, a="lora", b="lora", other="frozen", trainable="lora"),
    )
