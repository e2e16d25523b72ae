"""``jlora.nnx.summary``: the table of an NNX model's adapted layers."""

from __future__ import annotations

from flax import nnx

from .._summary import AdapterSummary
from .._summary import summary as summarise
from ._convert import adapted, check_module, to_adapters


def summary(model: nnx.Module) -> AdapterSummary:
    """A table of the adapted layers of ``model``: path, layer kind, weight shape, rank, scale and
    trainable parameters, and their share of the model's ``nnx.Param`` parameters. A DoRA
    layer's (:func:`jlora.variants.dora_nnx`) count includes its magnitude.

    Args:
        model: an adapted model.

    Returns:
        A :class:`jlora.AdapterSummary`; ``print`` it.

    Example:
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> model = jlora.nnx.lora(
        ...     nnx.Linear(6, 4, rngs=nnx.Rngs(0)), jlora.LoraConfig(targets="kernel", rank=2), rngs=0
        ... )
        >>> print(jlora.nnx.summary(model))
        path    kind        weight shape  rank  scale  params
        kernel  nnx.Linear  (6, 4)           2      8      20
        trainable params: 20 of 28 in the base (71.43%)
    """
    check_module(model, "summary")
    kinds = {
        path: type(module).__dict__["_jlora_kind"].name
        for path, (_, module) in adapted(model).items()
    }
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    from ..variants import nnx_magnitudes  # DoRA's (jlora.variants.dora_nnx): trained too

    return summarise(to_adapters(model), base, kinds=kinds, magnitudes=nnx_magnitudes(model))
