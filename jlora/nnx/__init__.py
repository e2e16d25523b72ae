"""LoRA for Flax NNX models: adapt any ``nnx.Module`` in place, train the factors, merge them away.

:func:`lora` gives every targeted ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``
and ``nnx.Embed`` (lookup and ``attend``) a pair of factors held in :class:`LoraParam` variables,
and the layer computes ``h = x W0 + scale * (drop(x) a) b`` in factored form (Hu et al. 2022)
through :mod:`jlora.ops`, never forming ``W0 + delta``. The base weights keep their paths, so
``nnx.state(model, nnx.Param)`` is the functional parameter tree and targets are the same
``/``-joined paths (``blocks/0/attn/query/kernel``) the functional core matches. Layouts come from
the module kinds.

:class:`LoraParam` is not an ``nnx.Param``: ``nnx.Optimizer(model, tx, wrt=LoraParam)`` trains the
factors only, ``nnx.split(model, LoraParam, ...)`` isolates them, and ``nnx.Param`` filters see
the frozen base only. :func:`to_adapters` and :func:`to_state` convert between the factors' state
and the functional adapter pytree of :func:`jlora.init`; :func:`merge` returns a plain model.

Trainable extras (``LoraConfig.trainable``: a classifier head, a resized embedding) are the model's
own ``nnx.Param`` s, trained in place: :func:`lora` marks them (metadata ``lora_trainable=True``;
they stay ``nnx.Param``), and :data:`TRAINABLE` selects factors and extras, for
``nnx.Optimizer(model, tx, wrt=jlora.nnx.TRAINABLE)``. They appear as :class:`jlora.Trainable` in
:func:`to_adapters`.

DoRA layers: :func:`jlora.variants.dora_nnx` gives adapted ``nnx.Linear`` / ``nnx.LinearGeneral``
layers a ``lora_magnitude`` :class:`LoraParam` (:mod:`jlora.nnx._dora`); :func:`merge` folds it.

LoRA dropout follows ``nnx.Dropout``: an adapted layer starts in train mode
(``deterministic=False``) and draws its masks from an ``nnx.RngStream`` forked at adaptation from
the ``dropout`` stream of ``rngs`` (``default`` if there is none); ``model.eval()``,
``model.train()`` and ``nnx.view(model, deterministic=...)`` switch it. Embedding adapters have no
dropout.

Sharding follows Flax's conventions: a weight with sharding metadata (``nnx.with_partitioning``,
``kernel_metadata={'out_sharding': ...}``) gives its factors derived names (``a``: its stack and
fan-in names plus the rank axis :data:`jlora.sharding.RANK_AXIS`, replicated; ``b``: the rank axis
plus its stack and fan-out names), and under a mesh (``jax.set_mesh``, Auto or Explicit axes) they
are created sharded, as Flax creates the layer's own variables; ``nnx.get_partition_spec``,
``nnx.Optimizer`` and :func:`merge` keep them so (:mod:`jlora.nnx._sharding`).

Stacked layers (built with ``nnx.vmap``, run with ``nnx.scan`` or ``nnx.vmap``) get stacked factors
``a: (L, *fan_in, r)``, ``b: (L, r, *fan_out)`` and, with dropout, one rng stream per layer. A scan
over the module (``in_axes=0``, the usual form) slices every variable of it, so each step sees its
own layer's factors beside its kernel. A scan given ``nnx.StateAxes`` must slice
:class:`LoraParam` (and, with dropout, ``nnx.RngState``) along with ``nnx.Param``; otherwise the
factored product sees the whole stack and raises :class:`jlora.AdapterMismatchError`.

Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jlora, jlora.nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((3, 4))
    >>> y0 = model(x)
    >>> _ = jlora.nnx.lora(model, jlora.LoraConfig(targets=r".*kernel", rank=2), rngs=nnx.Rngs(2))
    >>> bool((model(x) == y0).all())  # b = 0: the adapted model equals the base at init
    True
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, jlora.nnx.LoraParam)))
    {'layers': {0: {'lora_a': (4, 2), 'lora_b': (2, 8)}, 1: {'lora_a': (8, 2), 'lora_b': (2, 2)}}}
"""

from ._adapted import LoraParam as LoraParam
from ._convert import set_adapters as set_adapters
from ._convert import to_adapters as to_adapters
from ._convert import to_state as to_state
from ._extras import TRAINABLE as TRAINABLE
from ._lora import lora as lora
from ._merge import merge as merge
from ._summary import summary as summary

__all__ = [
    "TRAINABLE",
    "LoraParam",
    "lora",
    "merge",
    "set_adapters",
    "summary",
    "to_adapters",
    "to_state",
]
