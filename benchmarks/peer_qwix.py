"""The qwix peer: Google's qwix ``LoraProvider`` on the same Linen decoder (optional).

qwix intercepts the ``dot_general`` of matched modules and adds ``(x a) b * alpha / r``; its factors
live in ``params`` next to each kernel (``kernel_lora_a``, ``kernel_lora_b``). The step
differentiates those factors only, with the base weights passed as a separate frozen tree.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from typing import Any

import jax

from jlora._paths import leaves_with_paths, nest


def available() -> str | None:
    """None if qwix imports here, else why the qwix peer is skipped."""
    if importlib.util.find_spec("qwix") is None:
        return f"qwix peer skipped: qwix not installed in {sys.executable} (pip install qwix)"
    return None


def module_regex(weight_regex: str) -> str:
    """qwix matches module paths (``layers_0/query``), jlora weight paths (``.../query/kernel``)."""
    return weight_regex.removesuffix("/kernel").replace(".*/", r"layers_\d+/")


def build(model, params, tokens, weight_regex: str, *, rank: int, alpha: float):
    """Returns ``(lora_params, apply(lora_params, params, tokens))`` for qwix on ``model``."""
    import qwix

    provider = qwix.LoraProvider(module_path=module_regex(weight_regex), rank=rank, alpha=alpha)
    lora_model = qwix.apply_lora_to_model(model, provider)
    initial = leaves_with_paths(lora_model.init(jax.random.key(2), tokens)["params"])
    lora_params = {p: leaf for p, leaf in initial if re.search(r"_lora_[ab]$", p)}

    def apply(lora_params: dict[str, Any], params: Any, tokens: jax.Array) -> jax.Array:
        flat = dict(leaves_with_paths(params))
        flat.update(lora_params)
        return lora_model.apply({"params": nest(flat)}, tokens)

    return lora_params, apply
