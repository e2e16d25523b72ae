"""Reading a PEFT LoRA adapter (plain or DoRA) back as jlora factors and the LoraConfig it implies."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._config import LoraConfig
from .._errors import AdapterMismatchError, ConfigError, PeftFormatError
from .._extras import Trainable
from .._factors import LoraFactors
from .._layout import Layout
from .._paths import leaves_with_paths, nest
from .._targets import default_layout
from . import _adapter_config, _dora, _extras, _files
from ._files import CONFIG_NAME, WEIGHTS_NAME, Kind
from ._names import module_to_path


def _fit(module: str, path: str, kind: Kind, leaf: Any, a: np.ndarray, b: np.ndarray) -> None:
    shape = tuple(getattr(leaf, "shape", ()))
    r = a.shape[0]
    a_name, b_name = _files.NAMES[kind, "A"], _files.NAMES[kind, "B"]
    if len(shape) != 2:
        raise AdapterMismatchError(
            f"{path} (torch module {module}): the weight has shape {shape} but PEFT's {kind} "
            "adapter needs a 2-D weight; stacked (scanned) or multi-axis weights cannot take PEFT "
            "adapters. Unstack or reshape the parameters, or map this module elsewhere with "
            "module_to_path"
        )
    fan_in, fan_out = shape
    if a.shape[1] != fan_in or b.shape[0] != fan_out:
        raise AdapterMismatchError(
            f"{path} (torch module {module}): PEFT factors {a_name} {a.shape}, {b_name} {b.shape} "
            f"do not fit the weight of shape {shape}; expected {a_name} ({r}, {fan_in}) and "
            f"{b_name} ({fan_out}, {r}). Were these adapters made for another model, or does "
            "module_to_path pick the wrong weight?"
        )


def load(
    directory: str | os.PathLike[str],
    params: Any,
    *,
    module_to_path: Callable[[str, Kind], str] = module_to_path,
    check_finite: bool = True,
) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT LoRA adapter as jlora adapters and a config, checked against ``params``.

    Each adapter's scale is PEFT's (``lora_alpha / r`` or ``/ sqrt(r)``, with ``rank_pattern`` and
    ``alpha_pattern`` resolved by PEFT's own matching rule), so ``merge(params, adapters)`` is the
    model PEFT would build. The returned config targets exactly the adapted paths (escaped
    regexes), with per-path ranks and alphas as ``rank_pattern`` / ``alpha_pattern``, so
    ``config.scale_for(path)`` and ``jlora.init(key, params, config)`` agree with the adapters.
    Factors come back as float32 whatever the file's dtype (float16/bfloat16 are widened exactly).
    Tensors of ``modules_to_save`` come back as :class:`jlora.Trainable` extras at their parameter
    paths (a Linear weight transposed to a kernel), in the dtype of the base's leaf, and the
    config's ``trainable`` lists those paths.

    Args:
        directory: a directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        params: the base parameters (arrays or ``jax.ShapeDtypeStruct``); only shapes are read.
        module_to_path: maps a torch module's dotted name and its kind (``"linear"`` or
            ``"embedding"``) to the Flax parameter path of its weight.
        check_finite: refuse tensors holding NaN or infinite values (on by default: the check
            costs far less than reading the file).

    Returns:
        ``(adapters, config)``: the adapter pytree (sparse, mirroring ``params``) and its config.

    Raises:
        FileNotFoundError: a file is missing.
        PeftFormatError: not a LoRA adapter, a feature jlora cannot represent (lora bias, conv
            layers, PiSSA-style initialisations that changed the base, ...), a DoRA adapter
            (read it with :func:`load_dora`), malformed or
            damaged tensors (digest), a config from another save than the tensors, ranks that
            disagree with the config, or a ``modules_to_save`` entry without tensors.
        NonFiniteError: a tensor holds NaN or infinite values (``check_finite``; a
            ``ValueError``).
        AdapterMismatchError: a module maps to no parameter, or its factors do not fit the weight;
            a saved module's tensor fits no parameter.

    Warns:
        UserWarning: the config has keys PEFT's LoraConfig does not define (they are ignored).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jlora
        >>> params = {"embed": {"embedding": jnp.ones((10, 4))}, "out": {"kernel": jnp.ones((4, 3))}}
        >>> config = jlora.LoraConfig(targets=".*(kernel|embedding)", rank=2, alpha=4.0)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     jlora.peft.save(d, adapters, config)
        ...     loaded, loaded_config = jlora.peft.load(d, params)
        >>> loaded["out"]["kernel"].a.shape, loaded["out"]["kernel"].scale
        ((4, 2), 2.0)
    """
    adapters, config, _ = _load(directory, params, module_to_path, check_finite, dora=False)
    return adapters, config


def load_dora(
    directory: str | os.PathLike[str],
    params: Any,
    *,
    module_to_path: Callable[[str, Kind], str] = module_to_path,
    check_finite: bool = True,
) -> tuple[dict[str, Any], dict[str, Any], LoraConfig]:
    """Reads a PEFT DoRA adapter (``use_dora: true``): factors, magnitudes and config.

    As :func:`load`, plus each module's ``lora_magnitude_vector`` as the DoRA magnitude of its
    weight: PEFT's ``||W + s B A||`` over the input features of the torch ``(out, in)`` weight is
    jlora's norm over the fan-in of each kernel column, one per output unit, so it is taken as it
    is (``jlora.peft._dora``). Run it with ``jlora.linen``'s ``apply(..., magnitudes=)``, or fold
    it with :func:`jlora.variants.dora_merge`.

    Args:
        directory: a directory holding a PEFT DoRA adapter.
        params: the base parameters (arrays or ``jax.ShapeDtypeStruct``); only shapes are read.
        module_to_path: as for :func:`load`.
        check_finite: as for :func:`load`.

    Returns:
        ``(adapters, magnitudes, config)``, the magnitudes ``{path: m}`` nested like the adapters.

    Raises:
        PeftFormatError: as :func:`load`; the file is not a DoRA adapter (use :func:`load`), or a
            module lacks its magnitude or has one of the wrong shape.
        FileNotFoundError: a file is missing.
        AdapterMismatchError: as :func:`load`.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jlora
        >>> from jlora.variants import dora_magnitudes
        >>> params = {"out": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}}
        >>> config = jlora.LoraConfig(targets=".*kernel", rank=1)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     jlora.peft.save(d, adapters, config, magnitudes=dora_magnitudes(params, adapters))
        ...     loaded, magnitudes, _ = jlora.peft.load_dora(d, params)
        >>> magnitudes["out"]["kernel"].tolist()
        [5.0, 1.0]
    """
    adapters, config, magnitudes = _load(directory, params, module_to_path, check_finite, dora=True)
    return adapters, nest(magnitudes), config


def _load(
    directory: Any,
    params: Any,
    module_to_path: Callable[[str, Kind], str],
    check_finite: bool,
    dora: bool,
) -> tuple[dict[str, Any], LoraConfig, dict[str, Any]]:
    """``load``'s work (``load_dora``'s with ``dora``): ``(adapters, config, {path: m})``."""
    directory = _checks.path(directory, "directory")
    _checks.function(module_to_path, "module_to_path", "lambda module, kind: module + '/kernel'")
    _checks.flag(check_finite, "check_finite")
    data, config_file = _files.read_config_data(directory)
    weights_file = os.path.join(directory, WEIGHTS_NAME)
    tensors = _files.read_tensors(directory, check_finite)
    data = _files.check_pair(directory, data, _files.read_metadata(weights_file))
    settings = _adapter_config.read(data, config_file)
    _dora.check_kind(settings.use_dora, dora, config_file)
    lora_tensors, saved = _extras.split_saved(tensors, settings.modules_to_save, weights_file)
    modules = _files.group(lora_tensors, weights_file)
    leaves = dict(leaves_with_paths(params))
    by_path: dict[str, tuple[str, dict[str, Any]]] = {}
    for module, entry in modules.items():
        kind = entry["kind"]
        path = module_to_path(module, kind)
        if path not in leaves:
            closest = difflib.get_close_matches(str(path), list(leaves), n=5, cutoff=0.0)
            raise AdapterMismatchError(
                f"{path}: PEFT adapter of torch module {module!r} maps to this path, which the "
                f"parameters do not have. Closest paths: {closest}. Were these adapters made for "
                "another model? Otherwise pass module_to_path= mapping module names to this "
                "model's parameter paths"
            )
        if path in by_path:
            raise PeftFormatError(
                f"{path}: torch modules {by_path[path][0]!r} and {module!r} both map to this path; "
                "fix module_to_path"
            )
        _fit(module, path, kind, leaves[path], entry["A"], entry["B"])
        rank, expected = entry["A"].shape[0], settings.rank_for(module)
        if rank != expected:
            raise PeftFormatError(
                f"{module}: the tensors have rank {rank} but {CONFIG_NAME} gives this module rank "
                f"{expected} (from r and rank_pattern), and PEFT would refuse the file. Fix r or "
                "rank_pattern"
            )
        by_path[path] = (module, entry)
    extras: dict[str, Trainable] = {}
    for (module, name), tensor in saved.items():
        path, value = _extras.saved_path(
            module,
            name,
            np.asarray(tensor),
            leaves,
            module_to_path(module, "linear"),
            module_to_path(module, "embedding"),
        )
        if path in by_path or path in extras:
            raise PeftFormatError(
                f"{path}: the saved module tensor {module}.{name} maps to a parameter that "
                f"{'has a LoRA adapter' if path in by_path else 'another tensor maps to'}; fix "
                "module_to_path"
            )
        dtype = leaves[path].dtype
        extras[path] = Trainable(jnp.asarray(value.astype(np.float32)).astype(dtype))
    ordered = [p for p in leaves if p in by_path]
    extras = {p: extras[p] for p in leaves if p in extras}
    config = _config_for(
        ordered, by_path, settings, leaves, os.path.join(directory, CONFIG_NAME), list(extras)
    )
    adapters: dict[str, Any] = dict(extras)
    for path in ordered:
        module, entry = by_path[path]
        layout = Layout(1, 1, embedding=entry["kind"] == "embedding")
        a = jnp.asarray(np.asarray(entry["A"]).astype(np.float32).T)
        b = jnp.asarray(np.asarray(entry["B"]).astype(np.float32).T)
        adapters[path] = LoraFactors(a, b, config.scale_for(path), layout)
    magnitudes = _dora.read_magnitudes(by_path, settings.use_dora, weights_file)
    return nest(adapters), config, magnitudes


def _config_for(
    paths: list[str],
    by_path: dict[str, tuple[str, dict[str, Any]]],
    settings: _adapter_config.PeftSettings,
    leaves: dict[str, Any],
    where: str,
    trainable: list[str] = (),
) -> LoraConfig:
    rank_pattern, alpha_pattern, layouts = {}, {}, {}
    for path in paths:
        module, entry = by_path[path]
        key = re.escape(path)
        rank, alpha = settings.rank_for(module), settings.alpha_for(module)
        if rank != settings.r:
            rank_pattern[key] = rank
        if alpha != settings.lora_alpha:
            alpha_pattern[key] = alpha
        embedding = entry["kind"] == "embedding"
        if default_layout(path, tuple(leaves[path].shape)).embedding != embedding:
            layouts[key] = "vo" if embedding else "io"
    try:
        return LoraConfig(
            targets=tuple(re.escape(p) for p in paths),
            rank=settings.r,
            alpha=settings.lora_alpha,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            dropout=settings.lora_dropout,
            init=settings.init,
            use_rslora=settings.use_rslora,
            layouts=layouts,
            trainable=tuple(re.escape(p) for p in trainable),
        )
    except ConfigError as e:
        raise PeftFormatError(f"{where}: {e}") from None
