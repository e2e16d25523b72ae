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
from typing import Any

from ._config import LoraConfig
from ._errors import NotAnArrayError, TargetError
from ._layout import Layout
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


def select(params: Any, config: LoraConfig) -> list[Target]:
    """The weights of ``params`` that ``config`` targets, validated, in tree order.

    Raises:
        TargetError: a target pattern matches no path, a targeted weight has fewer than 2 axes or an
            ambiguous shape with no layout, or a rank exceeds ``min(fan_in, fan_out)``.
        NotAnArrayError: a targeted leaf is not an array.
    """
    leaves = leaves_with_paths(params)
    paths = [p for p, _ in leaves]
    for pattern in config.targets:
        if not any(re.fullmatch(pattern, p) for p in paths):
            raise TargetError(
                f"target {pattern!r} matches no parameter path (patterns must match the whole "
                f"'/'-joined path). Closest paths: {_closest(pattern, paths)}. Fix the pattern, "
                "e.g. prefix it with '.*' to match at any depth"
            )
    targets = []
    for path, leaf in leaves:
        if not config.selects(path):
            continue
        if not _is_array_like(leaf):
            raise NotAnArrayError(
                f"{path}: targeted a leaf of type {type(leaf).__name__}, not an array; expected a "
                "weight (jax/numpy array or jax.ShapeDtypeStruct). Narrow LoraConfig.targets or add "
                "this path to exclude"
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
        targets.append(Target(path, shape, leaf.dtype, layout, rank, config.scale_for(path)))
    if not targets:
        raise TargetError(
            f"targets {list(config.targets)} minus exclude {list(config.exclude)} select no weight; "
            f"paths include {paths[:8]}. Loosen LoraConfig.exclude"
        )
    return targets
