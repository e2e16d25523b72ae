"""The factors' way into a Linen model's ``params`` and back out (:mod:`jlora.linen._intercept`).

:func:`inject` puts each adapter next to its weight at ``<weight path>@lora`` (a trainable extra
replaces its weight); :func:`strip` removes those entries from the collections a call returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import AdapterMismatchError
from .._extras import Trainable, check_extra_fit
from .._factors import LoraFactors
from .._paths import unbox
from .._weight_merge import check_fit
from ..quant._weight import QuantizedWeight
from ..variants._dora_layers import DORA_SUFFIX
from ._intercept import SUFFIX


def inject(
    params: Any, table: dict[str, LoraFactors], extras: Mapping[str, Trainable] | None = None
) -> dict[str, Any]:
    """A shallow copy of ``params`` with each adapter at ``<weight path>@lora``.

    Each trainable extra replaces its weight (``params`` itself is not modified), so the model
    computes with, and differentiates, the extra's value.
    """
    root = dict(params)
    copied = {id(root)}
    extras = extras or {}
    for path, factors in [*table.items(), *extras.items()]:
        *parents, name = path.split("/")
        node = root
        for key in parents:
            child = node.get(key)
            if not isinstance(child, Mapping):
                node = None
                break
            if id(child) not in copied:
                child = dict(child)
                copied.add(id(child))
                node[key] = child
            node = child
        if node is None or name not in node:
            what = "a trainable extra" if path in extras else "factors"
            raise AdapterMismatchError(
                f"{path}: the adapters have {what} at this path but the params have no such "
                "weight. Were these adapters made for another model? Create them with "
                "LoraModel.init_adapters on this model's params"
            )
        if isinstance(factors, Trainable):
            check_extra_fit(path, node[name], factors)
            node[name] = factors.value
            continue
        weight = node[name]  # a quantised weight has a shape and dtype; unboxing would dequantise
        check_fit(path, weight if isinstance(weight, QuantizedWeight) else unbox(weight), factors)
        node[name + SUFFIX] = factors
    return root


def strip(tree: Any) -> Any:
    """``tree`` without ``@lora`` / ``@dora`` entries (for collections returned by ``mutable=``)."""
    if not isinstance(tree, Mapping):
        return tree
    return {k: strip(v) for k, v in tree.items() if not str(k).endswith((SUFFIX, DORA_SUFFIX))}
