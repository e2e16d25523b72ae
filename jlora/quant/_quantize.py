"""`quantize`: a params tree with its targeted weights stored as :class:`QuantizedWeight`.

Block layout. 4-bit kinds block ``block_size`` consecutive values of the weight's last axis (the
row-major blocks of bitsandbytes, for last axes divisible by the block size), so codes and absmax
constants keep every leading axis of the weight and its last axis divided by 2 and by
``block_size``; a multi-axis kernel (a conv's ``(*window, c_in, c_out)``, an einsum's in any
order) blocks its own last axis, whatever its role. With double quantisation the absmax constants
of each slice of the leading stack axes (the layout's leading ``s``: ``nn.scan`` / ``nnx.vmap``
stacks) are blocked on their own, so a stack slice is a valid :class:`QuantizedWeight`. A weight
sharded with a ``NamedSharding`` keeps its ``PartitionSpec`` on the codes and scales when each
shard of the last axis holds whole blocks; otherwise they are replicated.
int8 keeps the weight's shape and sharding; its scales (one per output channel) are replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from .._config import LoraConfig
from .._errors import ConfigError, TargetError
from .._paths import is_box, path_to_str, unbox
from .._targets import Target, select
from . import _codes
from ._weight import KINDS, QuantizedWeight


def _config(config_or_targets: LoraConfig | str | Sequence[str]) -> LoraConfig:
    if isinstance(config_or_targets, LoraConfig):
        return config_or_targets
    if isinstance(config_or_targets, str):
        config_or_targets = (config_or_targets,)
    # Rank 1 only so that selection checks shapes; the rank is never used.
    return LoraConfig(targets=tuple(config_or_targets), rank=1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _four_bit(w, kind: str, block_size: int, double_quant: bool, n_stack: int):
    absmax = _codes.block_absmax(w, block_size)
    if not double_quant:
        return _codes.encode(w, absmax, kind, block_size), absmax, None, None
    scales, scale_scales, offset = _codes.double_quantize(absmax, n_stack)
    # Codes are chosen for the absmax that dequantisation will use, not the exact one.
    used = _codes.double_dequantize(scales, scale_scales, offset, n_stack)
    return _codes.encode(w, used, kind, block_size), scales, scale_scales, offset


@functools.partial(jax.jit, static_argnums=(1,))
def _eight_bit(w, axes: tuple[int, ...]):
    return _codes.int8_quantize(w, axes)


def _check(target: Target, kind: str, block_size: int) -> None:
    shape = target.shape
    if kind == "int8":
        return
    if shape[-1] % block_size:
        raise TargetError(
            f"{target.path}: weight of shape {shape} has a last axis of {shape[-1]}, not a "
            f"multiple of block_size={block_size}; {kind} blocks run along the last axis and jlora "
            f"does not pad them. {_divisor_hint(shape[-1])}quantise it as int8, or leave this "
            "path out of the targets"
        )


def _divisor_hint(n: int) -> str:
    even = [d for d in (2, 4, 8, 16, 32) if n % d == 0]
    return f"Pass a block_size dividing it (e.g. {max(even)}), " if even else ""


def _shardings(w: Any, q: QuantizedWeight) -> Any:
    """Per-leaf shardings of ``q`` that keep the weight's spec where whole blocks allow it."""
    sharding = getattr(w, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (w.ndim - len(sharding.spec))
    replicated = NamedSharding(mesh, PartitionSpec())

    def fits(x) -> bool:
        for size, entry in zip(x.shape, spec, strict=True):
            names = entry if isinstance(entry, tuple) else (entry,)
            parts = 1
            for name in names:
                parts *= 1 if name is None else mesh.shape[name]
            if size % parts:
                return False
        return True

    def leaf_sharding(x):
        if x is None:
            return None
        if x.ndim == w.ndim and fits(x) and (q.kind == "int8" or x.shape[-1] != w.shape[-1]):
            if q.kind == "int8" and x is q.scales:
                return replicated
            return NamedSharding(mesh, PartitionSpec(*spec))
        return replicated

    return leaf_sharding


def quantize_weight(
    w: Any,
    *,
    kind: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    layout_roles: str | None = None,
) -> QuantizedWeight:
    """One weight as a :class:`QuantizedWeight` (see :func:`quantize` for the arguments).

    ``layout_roles`` is one role letter per axis (``"io"``); int8 reduces over the ``i`` (and
    ``v``) axes (all but the last when None); the leading ``s`` axes are stack axes, whose slices
    get their own double-quantisation constants.
    """
    shape, dtype = tuple(w.shape), jnp.dtype(w.dtype).name
    roles = layout_roles or "i" * (len(shape) - 1) + "o"
    if kind == "int8":
        axes = tuple(k for k, role in enumerate(roles) if role in "iv")
        codes, scales = _eight_bit(w, axes)
        from_end = tuple(k - len(shape) for k in axes)
        q = QuantizedWeight(codes, scales, None, None, "int8", dtype, 0, from_end)
    else:
        n_stack = len(roles) - len(roles.lstrip("s"))
        codes, scales, s2, offset = _four_bit(w, kind, block_size, double_quant, n_stack)
        q = QuantizedWeight(codes, scales, s2, offset, kind, dtype, block_size)
    place = _shardings(w, q)
    if place is None:
        return q
    placed = {f: getattr(q, f) for f in ("codes", "scales", "scale_scales", "scale_offset")}
    for name, x in placed.items():
        target = place(x)
        if target is not None:
            placed[name] = jax.device_put(x, target)
    return QuantizedWeight(**placed, **_meta(q))


def _meta(q: QuantizedWeight) -> dict[str, Any]:
    return {f: getattr(q, f) for f in ("kind", "dtype", "block_size", "axes")}


def quantize(
    params: Any,
    config_or_targets: LoraConfig | str | Sequence[str],
    *,
    kind: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> Any:
    """``params`` with each targeted weight replaced by a :class:`QuantizedWeight`.

    QLoRA's recipe is ``kind="nf4"``, ``block_size=64``, ``double_quant=True`` (about 4.13 bits
    per weight). int8 ignores ``block_size`` and ``double_quant``: one absmax per output channel.

    Args:
        params: the base parameter tree (concrete arrays).
        config_or_targets: a :class:`jlora.LoraConfig` (its targets, exclude and layouts; the
            adapters' own config is a natural choice) or target regexes / module names.
        kind: ``"nf4"``, ``"int4"`` or ``"int8"``.
        block_size: values per absmax block, along the weight's last axis (4-bit kinds).
        double_quant: quantise the absmax constants to 8 bits in blocks of 256 (4-bit kinds).

    Returns:
        A tree of the same structure, untargeted leaves the same objects.

    Raises:
        ConfigError: an unknown ``kind``, or a ``block_size`` that is not a positive even number.
        TargetError: a target selects nothing, a non-float or 1-D leaf, or (4-bit) a weight whose
            last axis is not a multiple of ``block_size``.

    Example:
        >>> import jax, jax.numpy as jnp, jlora.quant
        >>> params = {"dense": {"kernel": jnp.ones((64, 128)), "bias": jnp.zeros(128)}}
        >>> q = jlora.quant.quantize(params, ".*kernel")
        >>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"] is params["dense"]["bias"]
        ('QuantizedWeight', True)
    """
    if kind not in KINDS:
        raise ConfigError(f"kind: got {kind!r}; expected one of {KINDS}")
    if not (isinstance(block_size, int) and block_size > 0 and block_size % 2 == 0):
        raise ConfigError(
            f"block_size: got {block_size!r}; expected a positive even int (QLoRA uses 64)"
        )
    config = _config(config_or_targets)
    if any(isinstance(x, QuantizedWeight) for x in jax.tree.leaves(params, is_leaf=_is_q)):
        raise TargetError(
            "params already hold quantised weights; quantise the float params once (or "
            "jlora.quant.dequantize them first)"
        )
    targets = {t.path: t for t in select(params, config)}
    for t in targets.values():
        _check(t, kind, block_size)

    def leaf(path, w):
        name = path_to_str(path)
        if name not in targets:
            return w
        w = unbox(w)  # a sharding box's names are dropped; the array keeps its sharding
        roles = targets[name].layout.roles(len(targets[name].shape))
        return quantize_weight(
            w, kind=kind, block_size=block_size, double_quant=double_quant, layout_roles=roles
        )

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_box)


def _is_q(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)
