"""``jlora.nnx.merge``: an adapted NNX model back to a plain one, each adapted weight ``W0 + delta``
by :func:`jlora.merge`'s rule (DoRA's and quantised weights' by theirs)."""

from __future__ import annotations

from typing import TypeVar

import jax.numpy as jnp
from flax import nnx

from .._weight_merge import _combine, check_fit
from ..quant._weight import QuantizedWeight, dequantize
from ..variants._dora_layers import MAGNITUDE
from ._adapted import detach, weight_of
from ._convert import adapted, check_module, extras_of
from ._dora import merged_weight
from ._extras import unmark
from ._kinds import factors_of

M = TypeVar("M", bound=nnx.Module)


def merge(model: M, *, copy: bool = True) -> M:
    """A plain model with the adapters folded in: ``W = W0 + scale * a @ b``, no LoRA left.

    Each adapted layer becomes an instance of its original class again (``nnx.Linear``, ...) with
    no :class:`LoraParam` and no dropout attributes, and its weight is ``W0 + delta`` formed in
    float32 with ``Precision.HIGHEST`` and rounded once to the weight's dtype, as
    :func:`jlora.merge` does (a DoRA layer's, from :func:`jlora.variants.dora_nnx`, is
    :func:`jlora.variants.dora_merge`'s ``m V / ||V||_c``). A quantised weight (from
    :func:`jlora.quant.quantize_nnx`) becomes a float weight of its original dtype,
    ``dtype(f32(dequantize(q)) + delta)``, as ``jlora.quant.merge(..., dtype=q.dtype)``
    gives; quantised weights of layers without adapters stay quantised
    (:func:`jlora.quant.dequantize` turns them into float). Trainable extras keep their
    (trained) values and lose their mark, so the merged graphdef is the base's. Every other
    variable is unchanged.

    Args:
        model: an adapted ``nnx.Module``.
        copy: merge a copy (default) and leave ``model`` adapted; with ``copy=False`` the model
            itself is merged and returned.

    Returns:
        The merged model.

    Raises:
        TypeError: ``model`` is not an ``nnx.Module``.
        AdapterMismatchError: a layer's factors do not fit its weight.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> model = jlora.nnx.lora(
        ...     nnx.Linear(6, 4, rngs=nnx.Rngs(0)), jlora.LoraConfig(targets="kernel", rank=2), rngs=0
        ... )
        >>> model.lora_b.set_value(jnp.ones((2, 4)))
        >>> merged = merge(model)
        >>> type(merged).__name__, bool(jnp.allclose(merged(jnp.ones((1, 6))), model(jnp.ones((1, 6)))))
        ('Linear', True)
    """
    check_module(model, "merge")
    if copy:
        model = nnx.clone(model)
    for path, (_, module) in adapted(model).items():
        weight, factors = weight_of(module), factors_of(module)
        w0 = weight.get_value()
        check_fit(path, w0, factors)
        if MAGNITUDE in vars(module):  # DoRA: as jlora.variants.dora_merge
            weight.set_value(merged_weight(module))
        elif isinstance(w0, QuantizedWeight):  # jlora.quant.merge's rule, in the weight's dtype
            base = dequantize(w0, jnp.float32)
            weight.set_value(_combine(base, factors, subtract=False).astype(w0.dtype))
        else:
            weight.set_value(_combine(w0, factors, subtract=False))  # exactly jlora.merge's rule
        detach(module)
    for var in extras_of(model).values():
        unmark(var)
    return model
