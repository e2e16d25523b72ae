"""PEFT's AdaLoRA adapter files, read into :class:`jlora.variants.AdaloraFactors`.

PEFT's ``SVDLinear`` (``peft.tuners.adalora.layer``) holds, per module, ``lora_A: (r, in)``
(right singular vectors), ``lora_E: (r, 1)`` (singular values) and ``lora_B: (out, r)`` (left),
saved as ``base_model.model.<module>.lora_A`` / ``.lora_E`` / ``.lora_B`` (parameters of an
``nn.ParameterDict``: no ``.weight``; the adapter name removed). The module adds

    delta W = B (A * E) * scaling / (ranknum + 1e-5),    scaling = lora_alpha (or r if it is 0)

to the torch ``(out, in)`` weight, with ``ranknum = init_r`` (PEFT creates the layers at
``init_r`` and keeps that ``ranknum`` when it resizes them to a saved ``rank_pattern``; the
buffer itself is not saved). In jlora's ``(in, out)`` order that is ``p = A^T``, ``lam =
E[:, 0]``, ``q = B^T`` and ``scale = scaling / (init_r + 1e-5)``. Files saved after pruning hold
only the kept triplets (their rank is the tensors'); a module that kept none has no adapter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._errors import AdapterMismatchError, PeftFormatError
from .._layout import Layout
from .._paths import leaves_with_paths, nest
from . import _files

_SUFFIXES = {".lora_A": "A", ".lora_B": "B", ".lora_E": "E"}


def _number(data: dict, name: str, default: Any, where: str, integer: bool) -> Any:
    value = data.get(name, default)
    value = default if value is None else value
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok:
        raise PeftFormatError(
            f"{where}: {name!r} is {value!r}; expected {'an integer' if integer else 'a number'}"
        )
    return value


def _settings(data: Any, where: str) -> tuple[int, float]:
    """``(init_r, scaling)`` of an AdaLoRA ``adapter_config.json``."""
    if not isinstance(data, dict) or data.get("peft_type") != "ADALORA":
        found = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise PeftFormatError(
            f"{where}: peft_type is {found!r}; expected 'ADALORA'. Read LoRA adapters with "
            "jlora.peft.load (or load_dora)"
        )
    for name in ("use_dora", "modules_to_save", "layers_to_transform"):
        if data.get(name) not in (None, False, [], ()):
            raise PeftFormatError(
                f"{where}: {name} = {data[name]!r} is not supported in an AdaLoRA file by jlora; "
                "only the SVD triplets of target modules are read"
            )
    if data.get("bias", "none") not in ("none", None):
        raise PeftFormatError(
            f"{where}: bias = {data['bias']!r}: the file also holds trained biases of the base "
            "model, which jlora's AdaLoRA triplets cannot hold"
        )
    init_r = _number(data, "init_r", 12, where, integer=True)
    alpha = _number(data, "lora_alpha", 8, where, integer=False)
    if init_r <= 0 or alpha < 0:
        raise PeftFormatError(f"{where}: init_r {init_r} and lora_alpha {alpha}; expected > 0")
    return init_r, float(alpha if alpha > 0 else init_r)


def _group(tensors: dict[str, np.ndarray], where: str) -> dict[str, dict[str, np.ndarray]]:
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_files.PREFIX):
            raise PeftFormatError(
                f"{where}: tensor {key!r} is not an AdaLoRA triplet; expected names "
                f"'{_files.PREFIX}<module>.lora_A' / '.lora_B' / '.lora_E' (SVDLinear modules; "
                "embedding and conv AdaLoRA layers are not read)"
            )
        modules.setdefault(key[len(_files.PREFIX) : -len(suffix)], {})[_SUFFIXES[suffix]] = value
    for module, entry in modules.items():
        if set(entry) != {"A", "B", "E"}:
            raise PeftFormatError(
                f"{where}: module {module!r} has {sorted(entry)} of lora_A, lora_B, lora_E; an "
                "AdaLoRA module needs all three"
            )
        a, b, e = entry["A"], entry["B"], entry["E"]
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or e.shape != (r, 1):
            raise PeftFormatError(
                f"{where}: module {module!r} has lora_A {a.shape}, lora_B {b.shape}, lora_E "
                f"{e.shape}; expected A (r, in), B (out, r), E (r, 1) with one r"
            )
    if not modules:
        raise PeftFormatError(f"{where}: holds no tensors; expected AdaLoRA triplets")
    return modules


def load_adalora(
    directory: str | os.PathLike[str],
    params: Any,
    *,
    module_to_path: Callable[[str, str], str] | None = None,
    check_finite: bool = True,
) -> dict[str, Any]:
    """Reads a PEFT AdaLoRA adapter as :class:`jlora.variants.AdaloraFactors` triplets.

    ``p = lora_A^T``, ``lam = lora_E[:, 0]``, ``q = lora_B^T`` and ``scale = lora_alpha /
    (init_r + 1e-5)``, PEFT's own scaling, so ``jlora.merge(params,
    jlora.variants.adalora_to_lora(triplets))`` is the model PEFT builds from the file
    (``jlora.peft._adalora``). Modules saved with rank 0 (every triplet pruned) have no adapter.

    Args:
        directory: a directory holding a PEFT AdaLoRA ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        params: the base parameters (arrays or ``jax.ShapeDtypeStruct``); only shapes are read.
        module_to_path: maps a torch module's dotted name and ``"linear"`` to the Flax path of
            its weight (default :func:`jlora.peft.module_to_path`).
        check_finite: refuse tensors holding NaN or infinite values.

    Returns:
        The triplet tree, nested like ``params``, in float32.

    Raises:
        FileNotFoundError: a file is missing.
        PeftFormatError: not an AdaLoRA adapter, a setting jlora cannot hold (biases, saved
            modules, DoRA), or malformed tensors.
        AdapterMismatchError: a module maps to no 2-D parameter, or its triplets do not fit it.

    Example:
        >>> import json, os, tempfile, numpy as np, jax.numpy as jnp, jlora
        >>> from safetensors.numpy import save_file
        >>> from jlora.peft import load_adalora
        >>> from jlora.variants import adalora_to_lora
        >>> d = tempfile.mkdtemp()
        >>> key = "base_model.model.proj"
        >>> save_file({f"{key}.lora_A": np.ones((1, 3), np.float32),
        ...            f"{key}.lora_B": np.ones((2, 1), np.float32),
        ...            f"{key}.lora_E": np.full((1, 1), 2.0, np.float32)},
        ...           os.path.join(d, "adapter_model.safetensors"))
        >>> with open(os.path.join(d, "adapter_config.json"), "w") as f:
        ...     json.dump({"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 4}, f)
        >>> ada = load_adalora(d, {"proj": {"kernel": jnp.zeros((3, 2))}})
        >>> ada["proj"]["kernel"].lam.tolist(), round(ada["proj"]["kernel"].scale, 5)
        ([2.0], 1.0)
    """
    from . import module_to_path as default_module_to_path
    from ..variants._adalora import AdaloraFactors

    directory = _checks.path(directory, "directory")
    to_path = default_module_to_path if module_to_path is None else module_to_path
    _checks.function(to_path, "module_to_path", "lambda module, kind: module + '/kernel'")
    _checks.flag(check_finite, "check_finite")
    data, config_file = _files.read_config_data(directory)
    weights_file = os.path.join(directory, _files.WEIGHTS_NAME)
    tensors = _files.read_tensors(directory, check_finite)
    data = _files.check_pair(directory, data, _files.read_metadata(weights_file))
    init_r, scaling = _settings(data, config_file)
    scale = scaling / (init_r + 1e-5)
    leaves = dict(leaves_with_paths(params))
    out = {}
    for module, entry in _group(tensors, weights_file).items():
        path = to_path(module, "linear")
        shape = tuple(getattr(leaves.get(path), "shape", ()))
        a, b, e = (np.asarray(entry[k], np.float32) for k in "ABE")
        if path not in leaves or len(shape) != 2 or shape != (a.shape[1], b.shape[0]):
            raise AdapterMismatchError(
                f"{path}: the AdaLoRA triplets of torch module {module!r} (lora_A {a.shape}, "
                f"lora_B {b.shape}) need a 2-D weight ({a.shape[1]}, {b.shape[0]}) here; the "
                f"parameters have {shape if path in leaves else 'no such path'}. Pass "
                "module_to_path= mapping module names to this model's kernels"
            )
        if a.shape[0] == 0:
            continue  # every triplet pruned: no update
        out[path] = AdaloraFactors(
            jnp.asarray(a.T), jnp.asarray(e[:, 0]), jnp.asarray(b.T), scale, Layout(1, 1)
        )
    return nest({p: out[p] for p in leaves if p in out})
