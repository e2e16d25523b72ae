"""Selecting the weights a config targets, and inferring each one's layout.

A weight with 2 axes is a Dense kernel ``(fan_in, fan_out)`` (an embedding table if its leaf is named
``embedding``). Any other shape is ambiguous (stacked layers, multi-axis projections and conv kernels
all have 3+ axes), so it needs a layout in ``LoraConfig.layouts``; the Flax transforms supply those
from the module kinds themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from typing import Any

import jax.numpy as jnp

from ._checks import found
from ._config import LoraConfig
from ._errors import NotAnArrayError, SkippedTargetsWarning, TargetError, skipped_message
from ._layout import Layout
from ._match import PRESETS, is_module_name, literal, matcher
from ._paths import leaves_with_paths


@dataclasses.dataclass(frozen=True)
class Target:
    """A selected weight: where it is, its shape and dtype, and its adapter's settings."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    layout: Layout
    rank: int
    scale: float


def _closest(pattern: str, paths: list[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)


def _is_array_like(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype") and not isinstance(leaf, (str, bytes))


def default_layout(path: str, shape: tuple[int, ...]) -> Layout:
    """The layout of a weight with no override: 2 axes only, else a :class:`TargetError`."""
    if len(shape) < 2:
        raise TargetError(
            f"{path}: targeted a weight of shape {shape} (rank {len(shape)}); LoRA adapts matrices "
            "and tensors with at least 2 axes. Narrow the targets to kernels, e.g. "
            f"'{_kernel_hint(path)}', or add this path to LoraConfig.exclude"
        )
    if len(shape) == 2:
        return Layout.parse("vo" if path.rsplit("/", 1)[-1] == "embedding" else "io")
    raise TargetError(
        f"{path}: weight of shape {shape} has {len(shape)} axes and its shape alone does not say "
        "which are stack, fan-in and fan-out axes. Add a layout for it to the config, e.g. "
        f"layouts={{{re.escape(path)!r}: 'iio'}}: 'io'-style strings with 's' for stacked-layer "
        "axes, 'i' for fan-in, 'o' for fan-out ('sio' for scanned Dense, 'ioo' for a DenseGeneral "
        "query kernel, 'iiio' for a 2-D conv), or adapt it through jlora.linen / jlora.nnx, which "
        "infer layouts from the modules"
    )


def _kernel_hint(path: str) -> str:
    parent = path.rsplit("/", 1)[0] if "/" in path else path
    return f".*{re.escape(parent.rsplit('/', 1)[-1])}/kernel"


def _target(path: str, leaf: Any, config: LoraConfig) -> Target:
    """One targeted weight, validated (raises TargetError / NotAnArrayError)."""
    if not _is_array_like(leaf):
        raise NotAnArrayError(
            f"{path}: targeted a leaf of type {type(leaf).__name__}, not an array; expected a "
            "weight (jax/numpy array or jax.ShapeDtypeStruct). Narrow LoraConfig.targets or add "
            "this path to exclude"
        )
    if not _is_float(leaf.dtype):
        raise TargetError(
            f"{path}: targeted a weight of dtype {_dtype_name(leaf.dtype)}; LoRA adapts "
            "floating-point weights (merging a float delta into integers would truncate it, "
            "usually to nothing). Narrow LoraConfig.targets or add this path to exclude; for a "
            "quantized weight, adapt its floating-point copy"
        )
    shape = tuple(leaf.shape)
    spec = config.layout_for(path)
    layout = default_layout(path, shape) if spec is None else Layout.parse(spec)
    if not layout.fits(len(shape)):
        raise TargetError(
            f"{path}: layout {spec!r} needs at least {layout.own_ndim} "
            f"axes but the weight has shape {shape}; fix LoraConfig.layouts for this path"
        )
    rank = config.rank_for(path)
    if rank > layout.max_rank(shape):
        raise TargetError(
            f"{path}: rank {rank} is larger than min(fan_in, fan_out) = "
            f"{layout.max_rank(shape)} for a weight of shape {shape} (layout "
            f"{layout.spec(len(shape))!r}); a full-rank update needs no LoRA. Lower the rank "
            "with rank_pattern for this path, or exclude it"
        )
    return Target(path, shape, leaf.dtype, layout, rank, config.scale_for(path))


def _is_float(dtype: Any) -> bool:
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating))
    except TypeError:
        return False


def _dtype_name(dtype: Any) -> str:
    return getattr(dtype, "name", None) or str(dtype)


def check_unique_paths(paths: list[str], wanted: Any) -> None:
    """Raises :class:`TargetError` if two leaves that ``wanted(path)`` selects share a path.

    A dict key holding ``/`` (``{"a/b": w}``) has the same ``/``-joined path as a nested leaf
    (``{"a": {"b": w}}``), so one adapter would be added to both weights.
    """
    seen: set[str] = set()
    for path in paths:
        if path in seen and wanted(path):
            raise TargetError(
                f"{path}: two leaves of the parameter tree have this '/'-joined path (a dict key "
                "containing '/' next to the nested keys it spells), so one adapter would be "
                "applied to both. Rename the key so that it holds no '/'"
            )
        seen.add(path)


def check_patterns(paths: list[str], config: LoraConfig) -> None:
    """In strict mode, every target (but a preset) must match some path."""
    if not config.strict:
        return
    known = set(paths)
    for pattern in config.targets:
        if pattern in PRESETS or literal(pattern) in known:
            continue
        if any(matcher((pattern,))(p) for p in paths):
            continue
        kind = (
            f"module name {pattern!r} names no module with a 'kernel' or 'embedding' weight and"
            if is_module_name(pattern)
            else f"target {pattern!r}"
        )
        raise TargetError(
            f"{kind} matches no parameter path (regexes must match the whole '/'-joined path; "
            f"module names match at any depth). Closest paths: {_closest(pattern, paths)}. Fix "
            "the pattern, e.g. prefix a regex with '.*' to match at any depth, or pass "
            "strict=False to adapt what matches"
        )


def select(params: Any, config: LoraConfig) -> list[Target]:
    """The weights of ``params`` that ``config`` targets, validated, in tree order.

    With ``config.strict=False`` (and for paths only the ``"all-linear"`` preset selects),
    weights that cannot be adapted are skipped and reported in one
    :class:`jlora.SkippedTargetsWarning` instead of raising.

    Raises:
        TargetError: a target pattern matches no path, a targeted weight has fewer than 2 axes or an
            ambiguous shape with no layout, is not floating point, or shares its path with
            another leaf (a key holding ``/``), or a rank exceeds ``min(fan_in, fan_out)``.
        NotAnArrayError: a targeted leaf is not an array.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"config: got {found(config)}; expected a jlora.LoraConfig, e.g. "
            "jlora.LoraConfig(targets='.*attn/(query|value)/kernel', rank=8)"
        )
    leaves = leaves_with_paths(params)
    paths = [p for p, _ in leaves]
    check_patterns(paths, config)
    check_unique_paths(paths, lambda p: config.selects(p) or config.is_trainable(p))
    targets, skipped = [], {}
    for path, leaf in leaves:
        if not config.selects(path):
            continue
        try:
            targets.append(_target(path, leaf, config))
        except (TargetError, NotAnArrayError) as e:
            if config.strict and not config.by_preset_only(path):
                raise
            skipped[path] = str(e)
    if not targets:
        raise TargetError(
            f"targets {list(config.targets)} minus exclude {list(config.exclude)} select no "
            f"adaptable weight; paths include {paths[:8]}"
            + (
                f"; skipped: {skipped_message(skipped)}"
                if skipped
                else ". Loosen LoraConfig.exclude"
            )
        )
    if skipped:
        warnings.warn(skipped_message(skipped), SkippedTargetsWarning, stacklevel=3)
    return targets


def exact_config(
    config: LoraConfig,
    chosen: list[str],
    layouts: list[tuple[str, str]],
    skipped: dict[str, str],
    where: str,
    **changes: Any,
) -> LoraConfig:
    """The config a Flax transform hands :func:`jlora.init` once it has chosen the weights.

    Reports ``skipped`` weights (one :class:`SkippedTargetsWarning`), refuses an empty choice, and
    targets exactly the ``chosen`` paths with their ``layouts``; rank/alpha patterns and the rest
    apply as given.
    """
    if skipped:
        warnings.warn(skipped_message(skipped), SkippedTargetsWarning, stacklevel=3)
    if not chosen:
        raise TargetError(
            f"targets {list(config.targets)} select no weight {where} can adapt in this model "
            f"(skipped: {sorted(skipped) or 'none'}); check the targets"
        )
    return dataclasses.replace(
        config,
        targets=tuple(re.escape(p) for p in chosen),
        exclude=(),
        strict=True,
        layouts=(*layouts, *config.layouts),
        **changes,
    )
