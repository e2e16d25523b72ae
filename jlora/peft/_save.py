"""Writing jlora adapters as a PEFT LoRA adapter (``adapter_config.json`` + safetensors)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _checks
from .._config import LoraConfig
from .._errors import PeftFormatError
from .._merge import adapter_tables
from . import _adapter_config, _dora, _extras, _file_writes, _files
from ._files import Kind
from ._names import path_to_module


def _scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def save(
    directory: str | os.PathLike[str],
    adapters: Any,
    config: LoraConfig,
    *,
    path_to_module: Callable[[str], str] = path_to_module,
    target_modules: Sequence[str] | str | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    flatten: bool = False,
    magnitudes: Any = None,
) -> None:
    """Writes adapters as a PEFT LoRA adapter: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Everything is checked before anything is written, and each file is written to a temporary
    name and renamed into place, so a failed save leaves an existing adapter in ``directory``
    as it was. The tensors' header records digests of the tensors and of the config, which
    :func:`load` checks: a save killed between the two renames is completed by the next
    :func:`load` or :func:`save`, and a pair from two saves is refused (see
    ``jlora.peft._files``). Other files in ``directory`` are left alone.

    Args:
        directory: where to write (created if missing); the two files are replaced if present.
        adapters: the adapter pytree (2-D Dense and Embed adapters only); its trainable extras
            (2-D kernels and embeddings, 1-D scales and biases) are written as
            ``modules_to_save``.
        config: the config the adapters were made with; its alphas are written (PEFT stores alpha
            and rank, not the scale), and its dropout, rsLoRA flag and init scheme.
        path_to_module: maps a Flax parameter path to the torch module's dotted name.
        target_modules: PEFT's ``target_modules``; by default the list of adapted module names.
            A list of short names (``["q_proj", "v_proj"]``) or a regex string also works and must
            select every adapted module under PEFT's rules.
        base_model_name_or_path: recorded for PEFT (the Hub id or path of the torch base model).
        task_type: recorded for PEFT (e.g. ``"CAUSAL_LM"``); tensor names do not depend on it.
        flatten: write multi-axis kernels (DenseGeneral, einsum projections such as Gemma's
            ``(heads, d_model, head_dim)`` query) as the torch Linear whose weight is the 2-D
            ``(fan_in, fan_out)`` view, each group of axes flattened in the weight's order. Only
            for layers that are a Linear in torch: convolutions have the same layouts.
        magnitudes: DoRA magnitudes ``{path: m}`` (:func:`jlora.variants.dora_magnitudes`,
            trained): written as PEFT's ``use_dora`` adapter, ``m`` as each module's
            ``lora_magnitude_vector`` (read it back with :func:`load_dora`). Every adapter must be
            a Linear one and have its magnitude (PEFT makes every target module DoRA).

    Raises:
        PeftFormatError: an adapter has stack axes or (without ``flatten``) a multi-axis kernel, a path does not map to a
            module (or two map to the same one), an adapter's scale is not its config's
            ``alpha / r``, or ``target_modules`` misses an adapted module; an extra is not a
            Linear, Embedding or norm parameter, or belongs to an adapted module.
        TypeError: ``directory``, ``config``, ``path_to_module``, ``target_modules`` or
            ``flatten`` is of the wrong kind.
        NotADirectoryError: ``directory`` is, or lies under, a file.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, jlora
        >>> params = {"mlp": {"up": {"kernel": jnp.ones((4, 3))}}}
        >>> config = jlora.LoraConfig(targets=".*kernel", rank=2, alpha=4.0)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     jlora.peft.save(d, adapters, config)
        ...     sorted(os.listdir(d))
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> params["classifier"] = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
        >>> config = jlora.LoraConfig(targets="mlp/.*", rank=2, trainable=("classifier/.*",))
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     jlora.peft.save(d, adapters, config)
        ...     loaded, loaded_config = jlora.peft.load(d, params)
        >>> loaded_config.trainable, loaded["classifier"]["kernel"].value.shape
        (('classifier/bias', 'classifier/kernel'), (3, 2))
    """
    directory = _checks.path(directory, "directory")
    _checks.not_a_file(directory, "directory")
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"config: got {_checks.found(config)}; expected the jlora.LoraConfig the adapters were "
            "made with"
        )
    _checks.function(path_to_module, "path_to_module", "lambda path: path.replace('/', '.')")
    _checks.flag(flatten, "flatten")
    if target_modules is not None and not isinstance(target_modules, str):
        if not isinstance(target_modules, Sequence) or not all(
            isinstance(m, str) for m in target_modules
        ):
            raise TypeError(
                f"target_modules: got {_checks.found(target_modules)}; expected None, a regex "
                "string or a list of module names, e.g. ['q_proj', 'v_proj']"
            )
    table, extras = adapter_tables(adapters)
    if not table:
        raise PeftFormatError("save: the adapter tree is empty; expected the output of jlora.init")
    dora = None if magnitudes is None else _dora.magnitudes_for(table, magnitudes)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    kinds: dict[str, Kind] = {}
    owner: dict[str, str] = {}
    for path, f in table.items():
        kind, a_t, b_t = _files.peft_pair(path, f, flatten)
        module = path_to_module(path)
        if not isinstance(module, str) or not module or module.startswith(_files.PREFIX):
            raise PeftFormatError(
                f"{path}: path_to_module returned {module!r}; expected the torch module's dotted "
                f"name without the {_files.PREFIX!r} prefix, e.g. 'model.layers.0.self_attn.q_proj'"
            )
        if module in owner:
            raise PeftFormatError(
                f"{path} and {owner[module]} both map to torch module {module!r}; each module holds "
                "one adapter. Fix path_to_module"
            )
        owner[module] = path
        rank, alpha = a_t.shape[0], config.alpha_for(path)
        expected = _scale(alpha, rank, config.use_rslora)
        if not math.isclose(f.scale, expected, rel_tol=1e-12):
            raise PeftFormatError(
                f"{path}: adapter scale {f.scale} is not the config's alpha / "
                f"{'sqrt(r)' if config.use_rslora else 'r'} = {alpha} / {rank} = {expected}; PEFT "
                "stores alpha and r, not the scale. Pass the config these adapters were made with"
            )
        a_name, b_name = _files.NAMES[kind, "A"], _files.NAMES[kind, "B"]
        tensors[f"{_files.PREFIX}{module}.{a_name}"] = a_t
        tensors[f"{_files.PREFIX}{module}.{b_name}"] = b_t
        if dora is not None:
            tensors[f"{_files.PREFIX}{module}.{_dora.NAME}"] = _dora.vector(path, kind, dora, b_t)
        ranks[module], alphas[module], kinds[module] = rank, alpha, kind
    saved: dict[str, str] = {}
    for path, extra in extras.items():
        module, key, array = _extras.saved_tensor(path, extra.value, path_to_module)
        if module in owner:
            raise PeftFormatError(
                f"{path}: a trainable extra of torch module {module!r}, which also has a LoRA "
                f"adapter ({owner[module]}); PEFT saves a module either as a LoRA layer or whole "
                "(modules_to_save). Train the whole module (exclude it from the targets) or none of it"
            )
        if key in tensors:
            raise PeftFormatError(
                f"{path} and {saved[key]} both map to the tensor {key!r}; fix path_to_module"
            )
        tensors[key], saved[key] = array, path
    modules_to_save = sorted({key[len(_files.PREFIX) :].rpartition(".")[0] for key in saved})
    if target_modules is None:
        target_modules = sorted(ranks)
    for module, kind in kinds.items():
        if not _adapter_config.selects(target_modules, module, kind):
            raise PeftFormatError(
                f"target_modules {target_modules!r} does not select module {module!r} (adapter "
                f"{owner[module]}) under PEFT's rules (a list entry must equal the name or a "
                "dot-separated suffix of it; a string must match the whole name), so PEFT would "
                "drop its adapter. Add it, or leave target_modules=None"
            )
    data = _adapter_config.write(
        ranks,
        alphas,
        rank=config.rank,
        alpha=config.alpha,
        use_rslora=config.use_rslora,
        dropout=config.dropout,
        init=config.init,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        modules_to_save=modules_to_save,
        use_dora=dora is not None,
    )
    _file_writes.write_files(directory, tensors, data)
