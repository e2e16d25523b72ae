"""Hugging Face PEFT's LoRA adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A torch ``nn.Linear`` stores its weight ``W: (out, in)``, and PEFT adapts it as

    y = x W^T + s (x A^T) B^T        lora_A.weight = A: (r, in),  lora_B.weight = B: (out, r)

while a Flax kernel is ``(in, out)`` and jlora computes ``y = x W0 + s (x a) b`` with
``a: (in, r)``, ``b: (r, out)``: so ``A = a^T`` and ``B = b^T``. An ``nn.Embedding`` adds
``s A^T[ids] B^T`` with ``lora_embedding_A = A: (r, vocab)``, ``lora_embedding_B = B: (d, r)``;
jlora's table factors ``a: (vocab, r)``, ``b: (r, d)`` again give ``A = a^T``, ``B = b^T``. The
scale ``s`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) in both libraries, so
per-weight ranks and alphas travel as PEFT's ``rank_pattern`` / ``alpha_pattern``.

Tensors are named ``base_model.model.<module>.lora_A.weight`` (``lora_B.weight``,
``lora_embedding_A``, ``lora_embedding_B``), ``<module>`` being the torch module's dotted name, and
stored as float32. Which Flax path is which module is up to two functions; the defaults,
:func:`path_to_module` and :func:`module_to_path`, map ``a/b/c/kernel`` and ``a/b/c/embedding`` to
``a.b.c``. PEFT's format has one 2-D pair per module: adapters of stacked (scanned) layers,
multi-axis kernels and convolutions are refused with a message saying how to reshape them.

DoRA adapters (``use_dora``) add each module's ``lora_magnitude_vector``: :func:`save` with
``magnitudes=`` and :func:`load_dora` (``jlora.peft._dora``). PEFT's AdaLoRA files (``lora_A``,
``lora_E``, ``lora_B`` triplets) are read by :func:`load_adalora` (``jlora.peft._adalora``).

Trainable extras (:class:`jlora.Trainable`, ``LoraConfig.trainable``) are PEFT's
``modules_to_save``: ``adapter_config.json`` lists their modules and each tensor is stored under the
module's own name, ``base_model.model.<module>.weight`` (a Linear weight is the kernel transposed)
or ``.bias``. PEFT saves and loads *whole* modules, so make ``trainable`` cover every parameter of
such a module (``"classifier/.*"``), or PEFT will miss the others when it loads the file.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import _checks
from .._config import LoraConfig
from .._errors import AdapterMismatchError, ConfigError, PeftFormatError
from .._extras import Trainable
from .._factors import LoraFactors
from .._layout import Layout
from .._merge import adapter_tables
from .._paths import leaves_with_paths, nest
from .._targets import default_layout
from . import _adapter_config, _dora, _extras, _files
from ._files import CONFIG_NAME as CONFIG_NAME
from ._files import WEIGHTS_NAME as WEIGHTS_NAME
from ._adalora import load_adalora as load_adalora
from ._files import Kind

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PeftFormatError",
    "load",
    "load_adalora",
    "load_dora",
    "module_to_path",
    "path_to_module",
    "save",
]


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
        ...     save(d, adapters, config)
        ...     sorted(os.listdir(d))
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> params["classifier"] = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
        >>> config = jlora.LoraConfig(targets="mlp/.*", rank=2, trainable=("classifier/.*",))
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save(d, adapters, config)
        ...     loaded, loaded_config = load(d, params)
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
    _files.write_files(directory, tensors, data)


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
        ...     save(d, adapters, config)
        ...     loaded, loaded_config = load(d, params)
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
        ...     save(d, adapters, config, magnitudes=dora_magnitudes(params, adapters))
        ...     loaded, magnitudes, _ = load_dora(d, params)
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
