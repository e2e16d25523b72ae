"""DoRA for Flax NNX models: :func:`dora_nnx` turns adapted layers into DoRA layers in place.

The layer logic is in :mod:`jlora.nnx._dora`; these functions import :mod:`flax.nnx` on first use,
so ``import jlora.variants`` stays free of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._errors import TargetError
from .._paths import nest


def dora_nnx(model: Any, *, paths: Sequence[str] | None = None) -> Any:
    """Makes adapted ``nnx.Linear`` / ``nnx.LinearGeneral`` layers DoRA layers, in place.

    Each chosen layer gains a ``lora_magnitude`` :class:`jlora.nnx.LoraParam` ``m: (*stack,
    *fan_out)`` set to ``||W0 + scale a b||_c`` (the norm over the fan-in of each output unit's
    column; PEFT's ``lora_magnitude_vector``), and computes ``(x W0 + scale (x a) b) m /
    ||W0 + scale a b||_c + bias`` from then on, the norms from the expansion (nothing of ``W0``'s
    shape is formed). ``nnx.Optimizer(model, tx, wrt=jlora.nnx.LoraParam)`` trains ``a``, ``b``
    and ``m``; :func:`jlora.nnx.merge` folds the layer to ``m V / ||V||_c``;
    :func:`jlora.nnx.to_adapters` gives the factors and :func:`nnx_magnitudes` the magnitudes.

    Args:
        model: a model adapted by :func:`jlora.nnx.lora`.
        paths: the weight paths to make DoRA (default: every adapted layer).

    Returns:
        ``model`` itself.

    Raises:
        TargetError: the model has no adapted layer, a path is not an adapted weight, or a chosen
            layer is another kind (Einsum, Conv, Embed, custom), is quantised, or is DoRA already.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> from jlora.variants import dora_nnx
        >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        >>> model.kernel.set_value(jnp.array([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0]]))
        >>> y0 = model(jnp.ones((1, 3)))
        >>> model = dora_nnx(jlora.nnx.lora(model, jlora.LoraConfig("kernel", rank=1), rngs=1))
        >>> model.lora_magnitude.get_value().tolist(), bool((model(jnp.ones((1, 3))) == y0).all())
        ([5.0, 1.0], True)
    """
    from ..nnx._convert import adapted, check_module
    from ..nnx._dora import add_magnitude

    check_module(model, "dora_nnx")
    layers = adapted(model)
    if not layers:
        raise TargetError(
            "dora_nnx: the model has no adapted layers; adapt it first with jlora.nnx.lora(model, "
            "config, rngs=...)"
        )
    chosen = list(layers) if paths is None else list(paths)
    for path in chosen:
        if path not in layers:
            raise TargetError(
                f"{path}: dora_nnx: not an adapted weight of this model (adapted: "
                f"{sorted(layers)[:8]}); pass weight paths such as 'layers/0/kernel'"
            )
    for path in chosen:
        add_magnitude(path, layers[path][1])
    return model


def nnx_magnitudes(model: Any) -> dict[str, Any]:
    """The magnitudes ``{weight path: m}`` of a model's DoRA layers (:func:`dora_nnx`).

    With :func:`jlora.nnx.to_adapters` they are the pair that :func:`dora_merge`,
    ``jlora.linen``'s ``apply(..., magnitudes=)`` and ``jlora.peft.save(..., magnitudes=)`` take.

    Args:
        model: an adapted NNX model.

    Returns:
        A nested dict of arrays (empty if no layer is DoRA), sharing the model's arrays.

    Example:
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> from jlora.variants import dora_nnx, nnx_magnitudes
        >>> model = jlora.nnx.lora(
        ...     nnx.Linear(3, 2, rngs=nnx.Rngs(0)), jlora.LoraConfig("kernel", rank=1), rngs=1
        ... )
        >>> nnx_magnitudes(dora_nnx(model))["kernel"].shape
        (2,)
    """
    from ..nnx._convert import adapted, check_module

    check_module(model, "nnx_magnitudes")
    return nest(
        {
            path: module.lora_magnitude.get_value()
            for path, (_, module) in adapted(model).items()
            if "lora_magnitude" in vars(module)
        }
    )
