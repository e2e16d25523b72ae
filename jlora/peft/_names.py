"""The default maps between Flax parameter paths and torch module names (``a/b/c/kernel`` <-> ``a.b.c``)."""

from __future__ import annotations

from .._errors import PeftFormatError
from ._files import Kind


def path_to_module(path: str) -> str:
    """The default Flax-path-to-torch-module map: ``a/b/c/kernel`` and ``a/b/c/embedding`` -> ``a.b.c``.

    Raises:
        PeftFormatError: the path does not end in ``kernel`` or ``embedding``, or a key holds a dot.

    Example:
        >>> path_to_module("decoder/layers_0/attn/query/kernel")
        'decoder.layers_0.attn.query'
    """
    if not isinstance(path, str):
        raise PeftFormatError(
            f"path_to_module: got {path!r}; expected a '/'-joined parameter path such as "
            "'decoder/layers_0/attn/query/kernel'"
        )
    *parents, leaf = path.split("/")
    if leaf not in ("kernel", "embedding") or not parents or any("." in p for p in parents):
        raise PeftFormatError(
            f"{path}: the default path_to_module maps 'a/b/c/kernel' and 'a/b/c/embedding' (keys "
            "without dots) to the torch module 'a.b.c'; pass path_to_module= to save(), a function "
            "from this path to the module's dotted name in the torch model"
        )
    return ".".join(parents)


def module_to_path(module: str, kind: Kind) -> str:
    """The default torch-module-to-Flax-path map: ``a.b.c`` -> ``a/b/c/kernel`` (or ``/embedding``).

    Args:
        module: the module's dotted name in the torch model.
        kind: ``"linear"`` (the file has ``lora_A``/``lora_B``) or ``"embedding"``
            (``lora_embedding_A``/``lora_embedding_B``).

    Example:
        >>> module_to_path("model.embed_tokens", "embedding")
        'model/embed_tokens/embedding'
    """
    if not isinstance(module, str) or not module:
        raise PeftFormatError(
            f"module_to_path: module {module!r} is not a torch module name; expected a dotted "
            "name such as 'model.layers.0.self_attn.q_proj'"
        )
    if kind not in ("linear", "embedding"):
        raise PeftFormatError(
            f"module_to_path: kind {kind!r} is invalid; expected 'linear' or 'embedding'"
        )
    return module.replace(".", "/") + ("/embedding" if kind == "embedding" else "/kernel")
