"""Trainable extras as PEFT's ``modules_to_save``: tensor names and torch layouts.

PEFT trains a module listed in ``modules_to_save`` as a whole copy (``ModulesToSaveWrapper``) and
``get_peft_model_state_dict`` writes the copy's parameters under the module's own state-dict names,
adapter name removed: ``base_model.model.<module>.weight`` and ``.bias``; ``adapter_config.json``
lists the module names. Torch stores a Linear weight ``(out, in)``, the transpose of a Flax kernel
``(in, out)``; an Embedding weight ``(vocab, d)`` and a LayerNorm weight and bias are stored as
Flax has them (``embedding``, ``scale``, ``bias``). So:

    <module>/kernel (2-D)  <->  <module>.weight, transposed
    <module>/embedding     <->  <module>.weight
    <module>/scale         <->  <module>.weight   (1-D)
    <module>/bias          <->  <module>.bias

Tensors are stored as float32 (exact for float32, bfloat16 and float16 values) and cast back to the
base leaf's dtype on load.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from .._errors import AdapterMismatchError, PeftFormatError
from ._files import PREFIX, SUFFIXES

_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def saved_tensor(
    path: str, value: Any, path_to_module: Callable[[str], str]
) -> tuple[str, str, np.ndarray]:
    """``(module, tensor key, float32 array in torch layout)`` of the extra at ``path``.

    Raises:
        PeftFormatError: the leaf is not a 2-D kernel or embedding or a 1-D scale or bias.
    """
    parent, _, leaf = path.rpartition("/")
    ndim = len(value.shape)
    if leaf not in _NAMES or ndim != (2 if leaf in ("kernel", "embedding") else 1) or not parent:
        raise PeftFormatError(
            f"{path}: a trainable extra of shape {tuple(value.shape)}; PEFT's modules_to_save "
            "holds torch module parameters, and jlora writes a 2-D '<module>/kernel' (Linear "
            "weight) or '<module>/embedding' and a 1-D '<module>/scale' or '<module>/bias'. Save "
            "other extras with jlora.checkpoint, or leave them out of LoraConfig.trainable"
        )
    # The module's name comes from path_to_module, which maps weight paths: a bias or a scale
    # belongs to the module whose kernel would sit beside it.
    module = path_to_module(path if leaf in ("kernel", "embedding") else f"{parent}/kernel")
    array = np.asarray(jax.device_get(value)).astype(np.float32)
    if leaf == "kernel":
        array = array.T
    return module, f"{PREFIX}{module}.{_NAMES[leaf]}", np.ascontiguousarray(array)


def _saves(module: str, modules_to_save: Sequence[str]) -> bool:
    # PEFT wraps every module whose name ends with an entry of modules_to_save.
    return any(module.endswith(m) for m in modules_to_save)


def split_saved(
    tensors: dict[str, np.ndarray], modules_to_save: Sequence[str], where: str
) -> tuple[dict[str, np.ndarray], dict[tuple[str, str], np.ndarray]]:
    """``(LoRA tensors, {(module, parameter name): tensor})`` of a file's tensors.

    Raises:
        PeftFormatError: an entry of ``modules_to_save`` has no tensor in the file.
    """
    lora, saved = {}, {}
    for key, value in tensors.items():
        module, _, name = key[len(PREFIX) :].rpartition(".")
        is_lora = any(key.endswith(s) for s in SUFFIXES)
        if not is_lora and key.startswith(PREFIX) and module and _saves(module, modules_to_save):
            saved[module, name] = value
        else:
            lora[key] = value  # anything unknown is refused by _files.group
    for entry in modules_to_save:
        if not any(module.endswith(entry) for module, _ in saved):
            raise PeftFormatError(
                f"{where}: modules_to_save lists {entry!r} but the file holds no tensor of such a "
                f"module (expected e.g. '{PREFIX}<...>{entry}.weight'); was the file written "
                "without them? Remove the entry from adapter_config.json to load the LoRA factors"
            )
    return lora, saved


def saved_path(
    module: str,
    name: str,
    tensor: np.ndarray,
    leaves: dict[str, Any],
    linear_path: str,
    embedding_path: str,
) -> tuple[str, np.ndarray]:
    """The Flax path of a saved module tensor and the tensor in Flax layout.

    ``linear_path`` and ``embedding_path`` are ``module_to_path``'s answers for the module.

    Raises:
        PeftFormatError: the parameter name is not ``weight`` or ``bias``.
        AdapterMismatchError: no leaf of ``params`` fits the tensor.
    """
    parent = linear_path.rpartition("/")[0]
    if name == "weight":
        candidates = [
            (linear_path, tensor.T if tensor.ndim == 2 else None),
            (embedding_path, tensor if tensor.ndim == 2 else None),
            (f"{parent}/scale" if parent else "scale", tensor if tensor.ndim == 1 else None),
        ]
    elif name == "bias":
        candidates = [(f"{parent}/bias" if parent else "bias", tensor)]
    else:
        raise PeftFormatError(
            f"{module}.{name}: a saved module (modules_to_save) parameter jlora cannot map; it "
            "reads 'weight' (Linear, Embedding, LayerNorm) and 'bias' tensors"
        )
    for path, value in candidates:
        leaf = leaves.get(path)
        if value is not None and leaf is not None and tuple(leaf.shape) == value.shape:
            return path, value
    tried = [p for p, _ in candidates]
    closest = difflib.get_close_matches(tried[0], list(leaves), n=5, cutoff=0.0)
    raise AdapterMismatchError(
        f"{module}.{name}: saved module tensor of shape {tensor.shape} (modules_to_save) fits no "
        f"parameter; tried {tried} (a Linear weight is the transpose of a kernel). Closest paths: "
        f"{closest}. Were these adapters made for another model? Otherwise pass module_to_path="
    )
