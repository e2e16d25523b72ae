"""LoRA for any ``flax.linen`` model, without editing its code.

:func:`lora` wraps a Linen module and a :class:`jlora.LoraConfig`. Its :meth:`LoraModel.apply` takes
the frozen ``params`` and the trainable adapters as separate arguments and returns what
``model.apply`` returns, with every targeted layer computing (Hu et al. 2022)

    h = x W0 + scale * (drop(x) a) b

in factored form (:mod:`jlora.ops`): ``W0 + delta`` is never built, so a train step costs the
frozen forward and backward plus ``O(r (fan_in + fan_out))`` per row. Adapted layer kinds:
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` (their ``kernel``) and ``nn.Embed``
(its ``embedding``, for lookups and for ``attend``, the tied output head).

Targets are regexes over the paths of ``params`` (``layers/attn/query/kernel``, no leading
``params/``), as for :func:`jlora.init`, so the adapters of :meth:`LoraModel.init_adapters` also
work with :func:`jlora.merge`. Weight layouts (which axes are stack, fan-in and fan-out) come from
the module kinds, found by running the model abstractly once; users never write them.

Lifted transforms: the factors travel in the ``params`` collection next to their weight, so
``nn.scan`` (stacked layers, ``variable_axes={'params': 0}``), ``nn.vmap`` and ``nn.remat`` hand
each layer its own slice, as they do the kernel. Other collections (``batch_stats``, ``cache``)
pass through ``variables=``, and ``mutable=`` returns their updates as Flax does.

LoRA dropout (``config.dropout``) acts on each adapter's input in train mode only, that is when
``apply(..., lora_train=True)``. It draws from the ``'dropout'`` rng stream (``rng_stream=`` of
:func:`lora` changes it) inside each adapted module's own scope, so the model's own dropout masks
are unchanged. Inside ``nn.scan`` / ``nn.vmap`` the stream must be listed in ``split_rngs``, as for
the model's own dropout. Embedding lookups take no dropout.

DoRA (Liu et al. 2024): ``apply(..., magnitudes=m)`` with ``m`` from
:func:`jlora.variants.dora_magnitudes` makes those ``nn.Dense`` / ``nn.DenseGeneral`` layers DoRA
layers (:mod:`jlora.linen._dora`); the adapters themselves are the same.
"""

from ._model import LoraModel as LoraModel
from ._model import lora as lora

__all__ = ["LoraModel", "lora"]
