"""The files of a PEFT LoRA adapter: tensor names, the 2-D factor pairs, and atomic reads and writes.

Tensors are named ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` for Linear
modules and ``.lora_embedding_A`` / ``.lora_embedding_B`` for Embedding ones (PEFT's state-dict names
with the adapter name removed), stored as float32 with the header metadata ``{"format": "pt"}`` that
PEFT writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from . import _peft_config
from ._errors import PeftFormatError
from ._factors import LoraFactors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
Kind = Literal["linear", "embedding"]

PREFIX = "base_model.model."
SUFFIXES: dict[str, tuple[Kind, str]] = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
NAMES = {(kind, f): suffix[1:] for suffix, (kind, f) in SUFFIXES.items()}


def peft_pair(
    path: str, f: LoraFactors, flatten: bool = False
) -> tuple[Kind, np.ndarray, np.ndarray]:
    """One adapter as PEFT's float32 ``(kind, A = a^T, B = b^T)``.

    A 2-D adapter (``io`` or a transposed ``oi`` kernel: the factors are the same) is written as
    it is. With ``flatten``, a multi-axis kernel with no stack axis is written as the torch Linear
    it is when its fan-in and fan-out axes are each flattened in the weight's order (a
    DenseGeneral or einsum projection: ``(d, heads, head_dim)`` is ``Linear(d, heads * head_dim)``).
    Anything else is refused with the reason.
    """
    layout = f.layout
    spec = layout.spec(f.a.ndim - 1 + layout.fan_out_ndim)
    stacked = f.a.ndim - 1 - layout.fan_in_ndim
    two_d = layout.fan_in_ndim == 1 and layout.fan_out_ndim == 1
    if stacked or not (two_d or flatten):
        why = (
            f"has {stacked} stack axes (scanned or stacked layers, or one adapter per head or "
            "expert); unstack them into one adapter per layer (a[i], b[i] under a path per "
            "layer) and map each to its module"
            if stacked
            else "is a multi-axis kernel (DenseGeneral, Einsum or convolution). If the layer is "
            "a Linear in torch, pass flatten=True to write it as the 2-D (fan_in, fan_out) matrix "
            "it is with each group of axes flattened in the weight's order; a convolution has "
            "the same layout but cannot be written, so leave it out"
        )
        raise PeftFormatError(
            f"{path}: adapter a {tuple(f.a.shape)}, b {tuple(f.b.shape)} (layout {spec!r}) {why}. "
            "PEFT's LoRA format holds one 2-D pair per torch Linear or Embedding module"
        )
    rank = f.a.shape[-1]
    a = np.asarray(jax.device_get(f.a)).astype(np.float32).reshape(-1, rank)
    b = np.asarray(jax.device_get(f.b)).astype(np.float32).reshape(rank, -1)
    kind: Kind = "embedding" if layout.embedding else "linear"
    return kind, np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def write_files(
    directory: str | os.PathLike[str], tensors: dict[str, np.ndarray], config: dict[str, Any]
) -> None:
    """Writes both files into ``directory`` (created if missing), replacing them atomically."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    os.makedirs(directory, exist_ok=True)
    _replace_files(
        directory,
        {
            WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
            CONFIG_NAME: lambda p: _write_text(p, text),
        },
    )


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _replace_files(directory: str | os.PathLike[str], writers: dict[str, Callable]) -> None:
    # Stage every file under a temporary name first, then rename them in: a failure while writing
    # leaves the previous files untouched, and the renames themselves are atomic.
    staged: list[tuple[str, str]] = []
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            staged.append((tmp, os.path.join(directory, name)))
            write(tmp)
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def read_config(directory: str) -> _peft_config.PeftSettings:
    file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file}: no such file; expected a PEFT adapter directory holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (as written by PEFT's save_pretrained or jlora.peft.save)"
        )
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise PeftFormatError(f"{file}: not valid JSON ({e})") from None
    return _peft_config.read(data, file)


def read_tensors(directory: str) -> dict[str, np.ndarray]:
    file = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(file):
        pickled = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        raise FileNotFoundError(
            f"{file}: no such file; "
            + (
                "the directory has the pickled adapter_model.bin, which jlora does not read "
                "(unpickling runs code). Convert it with PEFT: load it and save_pretrained with "
                "safe_serialization=True"
                if pickled
                else f"expected the adapter's tensors next to {CONFIG_NAME}"
            )
        )
    try:
        with safe_open(file, framework="np") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as e:
        raise PeftFormatError(f"{file}: cannot be read as safetensors ({e})") from None


def group(tensors: dict[str, np.ndarray], where: str) -> dict[str, dict[str, Any]]:
    modules: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX) or len(key) <= len(PREFIX + suffix):
            raise PeftFormatError(
                f"{where}: tensor {key!r} is not a LoRA factor; expected names "
                f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight' / '.lora_embedding_A' / "
                "'.lora_embedding_B'. DoRA magnitudes, lora_B biases and saved whole modules "
                "cannot be read"
            )
        kind, which = SUFFIXES[suffix]
        module = key[len(PREFIX) : -len(suffix)]
        entry = modules.setdefault(module, {"kind": kind})
        if entry["kind"] != kind:
            raise PeftFormatError(
                f"{where}: module {module!r} has both Linear (lora_A/lora_B) and Embedding "
                "(lora_embedding_A/B) factors; expected one pair"
            )
        entry[which] = value
    for module, entry in modules.items():
        for which in ("A", "B"):
            if which not in entry:
                raise PeftFormatError(
                    f"{where}: module {module!r} has no {NAMES[entry['kind'], which]} tensor; "
                    "every adapted module needs both factors"
                )
        a, b = entry["A"], entry["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise PeftFormatError(
                f"{where}: module {module!r} has factors A {a.shape}, B {b.shape}; expected "
                "A (r, in) and B (out, r) with the same r. Conv-layer adapters (3- to 5-D) "
                "are not supported"
            )
    if not modules:
        raise PeftFormatError(f"{where}: holds no tensors; expected LoRA factors")
    return modules
