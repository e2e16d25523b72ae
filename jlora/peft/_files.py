"""The files of a PEFT LoRA adapter: tensor names, the 2-D factor pairs, the pair's digests, reads.

Tensors are named ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` for Linear
modules and ``.lora_embedding_A`` / ``.lora_embedding_B`` for Embedding ones (PEFT's state-dict names
with the adapter name removed), stored as float32 with the header metadata ``{"format": "pt"}`` that
PEFT writes.

**The two files as a pair.** jlora adds two digests to the safetensors header metadata (which PEFT
ignores): ``jlora_tensors_sha256``, of the tensors themselves, and ``jlora_config_sha256``, of the
``adapter_config.json`` written with them (:func:`config_digest`: of the keys that decide the
adapter's ranks and scales, so editing ``base_model_name_or_path`` by hand keeps the pair valid). Both files are staged
under temporary names, then renamed in, the tensors first. A kill between the two renames leaves
the new tensors beside the old config: :func:`read` sees the config digest differ, finds the new
config still staged beside them and completes the save (or, if there is none, refuses the pair
rather than load tensors with another adapter's ranks and scales). Files written by PEFT carry no
digests and are read as they are. The writes are in ``_file_writes``.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Literal

import jax
import numpy as np
from safetensors import safe_open

from .. import _digest
from .._errors import NonFiniteError, PeftFormatError
from .._factors import LoraFactors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
Kind = Literal["linear", "embedding"]

PREFIX = "base_model.model."
SUFFIXES: dict[str, tuple[Kind, str]] = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": ("linear", "M"),  # DoRA (use_dora): ||W + s B A|| per output
}
NAMES = {(kind, f): suffix[1:] for suffix, (kind, f) in SUFFIXES.items()}
TENSORS_DIGEST = "jlora_tensors_sha256"
CONFIG_DIGEST = "jlora_config_sha256"
# The keys that, with the tensors, decide what a loaded adapter computes: the pair digest's input.
_BOUND = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
          "modules_to_save")  # fmt: skip


def config_digest(config: Any) -> str:
    """The digest that binds an ``adapter_config.json`` to its tensors: of its ranks, alphas,
    rsLoRA flag and saved modules (other keys, descriptive or unknown, may change freely)."""
    if not isinstance(config, dict):
        return _digest.json_digest(config)
    return _digest.json_digest({k: config.get(k) for k in _BOUND})


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


def _staged(directory: str, name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(directory), f".{name}.*.tmp")))


def _load_json(file: str) -> Any:
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def _staged_config(directory: str, digest: str) -> tuple[str, Any] | None:
    """A config staged by an interrupted save whose digest is ``digest``, with its path."""
    for path in _staged(directory, CONFIG_NAME):
        try:
            data = _load_json(path)
        except (OSError, ValueError):
            continue  # killed while writing it
        if config_digest(data) == digest:
            return path, data
    return None


def read_metadata(file: str) -> dict[str, str]:
    """The safetensors header metadata of ``file`` ({} when it has none)."""
    try:
        with safe_open(file, framework="np") as fh:
            return dict(fh.metadata() or {})
    except Exception as e:
        raise PeftFormatError(f"{file}: cannot be read as safetensors ({e})") from None


def read_config_data(directory: str) -> tuple[Any, str]:
    """The parsed ``adapter_config.json`` and its path."""
    file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(file):
        kind = ""
        if os.path.isdir(os.path.join(directory, "jlora")):
            kind = (
                f" {directory} is a jlora adapter checkpoint: read it with jlora.checkpoint.restore"
            )
        elif os.path.isfile(os.path.join(directory, "_METADATA")):
            kind = f" {directory} is an orbax PyTree checkpoint (a model's parameters?), not an adapter"
        raise FileNotFoundError(
            f"{file}: no such file; expected a PEFT adapter directory holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (as written by PEFT's save_pretrained or jlora.peft.save).{kind}"
        )
    try:
        return _load_json(file), file
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftFormatError(
            f"{file}: not valid JSON ({e}); the file is damaged or is not a PEFT adapter config"
        ) from None


def check_pair(directory: str, data: Any, metadata: dict[str, str]) -> Any:
    """The config that belongs with tensors of header ``metadata`` (see the module docstring).

    Returns ``data`` when it matches (or the tensors carry no digest), else the config staged by
    the interrupted save that wrote the tensors, renamed into place when the directory allows.

    Raises:
        PeftFormatError: the config belongs to other tensors and no staged one matches.
    """
    expected = metadata.get(CONFIG_DIGEST)
    if expected is None or config_digest(data) == expected:
        return data
    staged = _staged_config(directory, expected)
    if staged is None:
        raise PeftFormatError(
            f"{directory}: {WEIGHTS_NAME} was written with another {CONFIG_NAME} than the one "
            "beside it (its ranks, alphas or targets differ from those the tensors were saved "
            "with): the files come from two saves, e.g. one interrupted or copied over. Save the "
            "adapter again, or copy both files from one save"
        )
    path, data = staged
    try:
        os.replace(path, os.path.join(directory, CONFIG_NAME))
    except OSError:  # a read-only directory: use the staged config as it is
        pass
    return data


def read_tensors(directory: str, check_finite: bool = True) -> dict[str, np.ndarray]:
    """The tensors of ``adapter_model.safetensors``, checked against their digest when it has one.

    Raises:
        FileNotFoundError: no such file.
        PeftFormatError: unreadable, or damaged (digest).
        NonFiniteError: a tensor holds NaN/Inf (with ``check_finite``).
    """
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
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
            metadata = dict(fh.metadata() or {})
    except Exception as e:
        raise PeftFormatError(f"{file}: cannot be read as safetensors ({e})") from None
    expected = metadata.get(TENSORS_DIGEST)
    if expected is not None and _digest.tensors_digest(tensors) != expected:
        raise PeftFormatError(
            f"{file}: the file is damaged: its tensors differ from the digest recorded when "
            "jlora saved them (a changed byte, or a tensor edited without updating the header). "
            "Save the adapter again"
        )
    if check_finite:
        for key, value in tensors.items():
            bad = _digest.count_nonfinite(value)
            if bad:
                raise NonFiniteError(
                    f"{file}: tensor {key!r} {tuple(value.shape)} holds {bad} NaN or infinite "
                    "values; merging it would put NaN/Inf into the model. The adapter is broken "
                    "(a diverged run?); pass check_finite=False to load it anyway"
                )
    return tensors


def group(tensors: dict[str, np.ndarray], where: str) -> dict[str, dict[str, Any]]:
    modules: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX) or len(key) <= len(PREFIX + suffix):
            raise PeftFormatError(
                f"{where}: tensor {key!r} is not a LoRA factor; expected names "
                f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight' / '.lora_embedding_A' / "
                "'.lora_embedding_B' (and '.lora_magnitude_vector' for DoRA). lora_B biases "
                "and saved whole modules cannot be read"
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
