"""`quantize_nnx`: an NNX model's targeted layer weights stored as :class:`QuantizedWeight`.

The weight's ``nnx.Param`` keeps its place and metadata; its value becomes the quantised weight (a
pytree, so ``nnx.split``, ``nnx.state``, ``jax.jit``, ``nnx.vmap`` and ``nnx.scan`` carry its codes
and scales, and a scan slice of a stacked weight is the quantised weight of that slice).
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` and ``nnx.Embed`` are supported:
they read their weight as ``param[...]``, which dequantises it. Each weight's layout comes from its
layer (as in ``jlora.nnx.lora``; ``LoraConfig.layouts`` may choose an einsum's), with the leading
axes of ``nnx.vmap``-stacked layers as stack axes. Adapted with ``jlora.nnx.lora``, each layer
computes its base output without a float copy of its whole weight (:mod:`jlora.quant._layers`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from .._config import LoraConfig
from .._errors import TargetError
from .._layout import Layout
from ._quantize import _config
from ._weight import QuantizedWeight

LAYERS = "nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv and nnx.Embed"


def _layers(model: Any) -> dict[str, tuple[Any, Any]]:
    """``{weight path: (module, kind)}`` of every built-in layer kind jlora.nnx adapts."""
    from flax import nnx

    from ..nnx._kinds import KINDS, kind_of

    out = {}
    builtin = {kind for _, kind in KINDS}
    for path, module in nnx.iter_modules(model):
        kind = kind_of(module)
        if kind in builtin:
            out["/".join(map(str, (*path, kind.weight)))] = (module, kind)
    return out


def _layout(module: Any, kind: Any, path: str, config: LoraConfig) -> str | None:
    """The layer's layout string (the config's choice for an einsum), or None if unsupported."""
    owner = path.rpartition("/")[0] or "the root module"
    try:
        spec = kind.spec(module, owner)
        given = config.layout_for(path)
        if given is not None and kind.choose is not None:
            spec = kind.choose(module, owner, Layout.parse(given))
    except TargetError:
        return None
    return spec


def quantize_nnx(
    model: Any,
    config_or_targets: LoraConfig | str | Sequence[str],
    *,
    kind: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> Any:
    """Quantises ``model``'s targeted layer weights in place and returns ``model``.

    Call it before ``jlora.nnx.lora`` (whose adapters then fit the quantised weights' shapes).
    Arguments are those of :func:`jlora.quant.quantize`; targets match ``<module path>/kernel``
    (``/embedding`` for ``nnx.Embed``). Layouts come from the layers, so a conv or einsum kernel
    needs no ``LoraConfig.layouts`` entry.

    Raises:
        TargetError: a target selects nothing, or a weight that is not the weight of an
            ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` or ``nnx.Embed``
            (or that :func:`jlora.quant.quantize` refuses).

    Example:
        >>> import jax.numpy as jnp, jlora.quant
        >>> from flax import nnx
        >>> model = jlora.quant.quantize_nnx(nnx.Linear(64, 128, rngs=nnx.Rngs(0)), "kernel")
        >>> type(model.kernel.get_value()).__name__, model(jnp.ones((2, 64))).shape  # kernel[...]
        ('QuantizedWeight', (2, 128))
    """
    from flax import nnx

    from ._quantize import quantize  # the float checks and messages of the tree version

    config = _config(config_or_targets)
    layers = _layers(model)
    found = {}
    for path, (module, layer_kind) in layers.items():
        spec = _layout(module, layer_kind, path, config)
        if spec is not None:
            found[path] = spec
    given = tuple(config.layouts)
    extra = tuple((re.escape(p), s) for p, s in found.items())
    config = dataclasses.replace(config, layouts=given + extra)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checked = quantize(params, config, kind=kind, block_size=block_size, double_quant=double_quant)

    def visit(tree: Any, prefix: str) -> None:
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, QuantizedWeight):
                if path not in layers:
                    raise TargetError(
                        f"{path}: jlora.quant.quantize_nnx quantises the weights of {LAYERS} "
                        "only (their 'kernel', or 'embedding'); other layers may read their "
                        "weight as an array. Narrow the targets"
                    )
                module, layer_kind = layers[path]
                getattr(module, layer_kind.weight).set_value(value)
            elif isinstance(value, dict):
                visit(value, path)

    visit(checked, "")
    return model
