"""Per-example factors gathered once, and training many adapters at once from one bank.

**Gather once.** :func:`gather` picks each example's factors out of the bank (``a[ids]``: the bank
axis ``N`` becomes the batch axis ``B``) and folds the id into the scale (0 for :data:`BASE`, NaN
for an id out of range). Passing the result with ``ids=None`` to :func:`jlora.serving.apply` (or
any term) skips the per-layer gather: a decode loop, whose ids do not change while it generates,
gathers once per sequence instead of at every step.

**Training several adapters in one batch.** Differentiate the loss with respect to the bank's
factors (``jax.grad(loss)(bank.factors, params, ids, batch)``). Slot ``n``'s gradient is the sum
of its examples' terms only:

    d loss / d a[n] = sum_{e: ids[e] = n} x_e^T (scale[n] g_e b[n]^T)

so a slot no example uses gets an exact zero (``jax.grad`` of a gather is a scatter-add of the
examples' terms; ``"onehot"`` multiplies the other slots' terms by an exact zero), and a
:data:`BASE` example, whose scale is 0, contributes exact zeros to whichever slot it was clipped
to. With a loss that is a *sum* over examples, one mixed step gives slot ``n`` exactly the gradient
of its own sub-batch alone (a mean over the batch scales it by ``B_n / B``).

**Padded ranks stay zero.** A padded column ``k`` of ``a`` gets ``x^T (scale g b[k]^T)`` with
``b[k] = 0``, and a padded row ``k`` of ``b`` gets ``(scale x a[:, k])^T g`` with ``a[:, k] = 0``:
each is zero as long as the other is. An optimizer whose update of a zero parameter with zero
gradients is zero (SGD, momentum, Adam, AdamW: decay of 0 is 0) keeps both at zero for the whole
run, so every adapter keeps its true rank. :meth:`AdapterBank.with_factors` checks it when the
trained factors come back.

**The scale is frozen.** It is a leaf of ``bank.factors`` (so hot swaps need no recompilation) but
it is the adapter's ``alpha / r``, not a parameter: :func:`freeze_scales` wraps an optimizer so the
scales get zero updates and no optimizer state (``optax.partition`` with ``optax.set_to_zero``, as
:func:`jlora.optim.freeze_base` freezes a base), and ``optax.apply_updates`` leaves them
bit-identical.

**Absent slots with a stateful optimizer.** One step from a fresh state moves only the slots in
the batch (SGD, Adam). Over many steps, momentum keeps moving a slot on earlier batches' gradients
and weight decay shrinks it (as for any parameter with a zero gradient), and Adam's bias
correction counts every step; put every task in every batch (or use plain SGD) where each slot
must equal its adapter trained alone.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from .._errors import BankError
from ..optim import _check_optimizer, _partition
from ._mixed import check_ids, example_scale
from ._slots import BankFactors


def _is_bank(x: Any) -> bool:
    return isinstance(x, BankFactors)


def gather(factors: Any, ids: jax.Array) -> Any:
    """Each example's factors from a bank: ``a: (B, ...)``, ``b: (B, ...)``, ``scale: (B,)``.

    Pass the result with ``ids=None`` to :func:`jlora.serving.apply`,
    :func:`jlora.serving.nnx_apply` or the terms: the same outputs without a gather in every
    layer (see the module docstring).

    Args:
        factors: an :class:`AdapterBank`'s :attr:`~AdapterBank.factors`.
        ids: ``(B,)`` adapter ids (:data:`BASE` for the base model).

    Returns:
        A tree like ``factors`` whose bank axis is the batch; a :data:`BASE` row has scale 0 and
        a row whose id is out of range has scale NaN.

    Raises:
        BankError: ``ids`` not of shape ``(B,)`` or not integers, or (eagerly) out of range.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.serving import BankFactors, dense_term, gather
        >>> f = BankFactors(jnp.ones((2, 3, 1)), jnp.ones((2, 1, 4)), jnp.array([1.0, 2.0]),
        ...                 jlora.Layout(1, 1))
        >>> rows = gather({"w": f}, jnp.array([1, -1, 0]))["w"]
        >>> rows.a.shape, rows.scale.tolist()
        ((3, 3, 1), [2.0, 0.0, 1.0])
        >>> dense_term(jnp.ones((3, 3)), None, rows)[:, 0].tolist()
        [6.0, 0.0, 3.0]
    """
    ids = jax.numpy.asarray(ids)
    leaves = jax.tree.leaves(factors, is_leaf=_is_bank)
    if not leaves or not all(isinstance(f, BankFactors) for f in leaves):
        raise BankError(
            "jlora.serving.gather: factors are not an AdapterBank's factors (a tree of "
            "BankFactors); pass bank.factors"
        )
    n = leaves[0].a.shape[0]
    check_ids(ids, ids.shape[0] if ids.ndim == 1 else -1, n, "jlora.serving.gather")
    idx = jax.numpy.clip(ids, 0, n - 1)

    def one(f: BankFactors) -> BankFactors:
        return BankFactors(f.a[idx], f.b[idx], example_scale(ids, f.scale, f.scale.dtype), f.layout)

    return jax.tree.map(one, factors, is_leaf=_is_bank)


def scale_labels(factors: Any, *, train: str = "factors", frozen: str = "scale") -> Any:
    """``factors`` with every ``a``/``b`` leaf labelled ``train`` and every scale ``frozen``."""

    def label(node: Any) -> Any:
        if isinstance(node, BankFactors):
            return BankFactors(train, train, frozen, node.layout)
        return frozen

    return jax.tree.map(label, factors, is_leaf=_is_bank)


def freeze_scales(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """Trains a bank's factors with ``optimizer`` and keeps its scales fixed.

    Args:
        optimizer: any optax optimizer (``jlora.optim.lora_plus(...)`` too).

    Returns:
        A transformation for ``bank.factors``: ``optimizer`` on every ``a`` and ``b``,
        ``optax.set_to_zero()`` (no state) on the scales.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jlora
        >>> from jlora.serving import AdapterBank, freeze_scales
        >>> params = {"w": jnp.ones((6, 4))}
        >>> one = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=2))
        >>> factors = AdapterBank.build(params, {"one": one}, capacity=2).factors
        >>> tx = freeze_scales(optax.sgd(0.5))
        >>> grads = jax.tree.map(jnp.ones_like, factors)
        >>> updates, _ = tx.update(grads, tx.init(factors), factors)
        >>> float(updates["w"].a[0, 0, 0]), updates["w"].scale.tolist()
        (-0.5, [0.0, 0.0])
    """
    _check_optimizer(optimizer)
    return _partition({"factors": optimizer, "scale": optax.set_to_zero()}, scale_labels)
