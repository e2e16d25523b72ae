"""Trainable extras in an NNX model: base ``nnx.Param`` s marked to train in full beside the factors.

An NNX model holds its own arrays, so a trainable extra (``LoraConfig.trainable``: a classifier
head, a resized embedding) is simply the model's own ``nnx.Param``, trained in place. It stays an
``nnx.Param`` (its type, path and every ``nnx.Param`` filter are unchanged: the base's parameter
tree is still ``nnx.state(model, nnx.Param)``); :func:`jlora.nnx.lora` only adds the metadata
``lora_trainable=True`` to it. :data:`TRAINABLE` selects the factors and the marked Params, for
``nnx.Optimizer(model, tx, wrt=jlora.nnx.TRAINABLE)``; :func:`jlora.nnx.merge` removes the mark.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import jlora, jlora.nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> config = jlora.LoraConfig(targets="layers/0/kernel", rank=2, trainable=("layers/1/.*",))
    >>> _ = jlora.nnx.lora(model, config, rngs=0)
    >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=jlora.nnx.TRAINABLE)
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, jlora.nnx.TRAINABLE)))
    {'layers': {0: {'lora_a': (4, 2), 'lora_b': (2, 8)}, 1: {'bias': (2,), 'kernel': (8, 2)}}}
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from ._adapted import LoraParam

MARK = "lora_trainable"


def is_extra(path: Any, x: Any) -> bool:
    """NNX filter: a variable marked as a trainable extra by :func:`jlora.nnx.lora`."""
    del path
    return isinstance(x, nnx.Variable) and bool(x.get_metadata().get(MARK, False))


TRAINABLE = nnx.Any(LoraParam, is_extra)


def mark(var: nnx.Variable) -> None:
    """Marks ``var`` as a trainable extra."""
    var.set_metadata(**{MARK: True})


def unmark(var: nnx.Variable) -> None:
    """Removes the mark of a trainable extra (a merged model is a plain model)."""
    if var.get_metadata().get(MARK, False):
        var.del_metadata(MARK)
