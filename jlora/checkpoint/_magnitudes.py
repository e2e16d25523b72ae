"""DoRA magnitudes in an adapter checkpoint (format version 3).

DoRA's magnitudes are a separate tree ``{weight path: m}`` next to the adapters
(:mod:`jlora.variants`), with ``m`` of shape ``(*stack, *fan_out)``: the factor ``b``'s shape
without its rank axis. ``save(..., magnitudes=m)`` stores each one beside its factors, as ``m`` in
the arrays item (``{path: {"a", "b", "m"}}``), with ``"magnitudes": {path: {"shape", "dtype"}}``
in the record and its SHA-256 at ``digests[path]["m"]``. Version 3 is written only when there are
magnitudes, so every other checkpoint keeps its version, and jlora versions that predate it refuse
such a checkpoint ("upgrade jlora") rather than restore a DoRA adapter as plain LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .. import _checks
from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from .._paths import leaves_with_paths

VERSION_MAGNITUDES = 3


def expected_shape(b_shape: tuple[int, ...], n_stack: int) -> tuple[int, ...]:
    """A magnitude's shape for a factor ``b`` of ``b_shape``: ``(*stack, *fan_out)``."""
    return (*b_shape[:n_stack], *b_shape[n_stack + 1 :])


def check(magnitudes: Any, table: Mapping[str, LoraFactors]) -> dict[str, Any]:
    """``{path: m}`` of a magnitude tree, each checked against its adapter's factors.

    Raises:
        AdapterMismatchError: a magnitude has no factors at its path, is not a float array, or its
            shape is not the weight's ``(*stack, *fan_out)``.
    """
    if magnitudes is None:
        return {}
    if not isinstance(magnitudes, Mapping):
        raise TypeError(
            f"magnitudes: got {_checks.found(magnitudes)}; expected None or DoRA's {{path: m}} "
            "tree (jlora.variants.dora_magnitudes, or jlora.variants.nnx_magnitudes(model))"
        )
    out = {}
    for path, m in leaves_with_paths(magnitudes):
        if path not in table:
            raise AdapterMismatchError(
                f"{path}: magnitudes hold a DoRA magnitude here but the adapters have no factors "
                f"at this path (adapted: {sorted(table)[:8]}); pass the magnitudes made for "
                "these adapters"
            )
        if not (hasattr(m, "shape") and hasattr(m, "dtype")) or not jnp.issubdtype(
            m.dtype, jnp.floating
        ):
            raise AdapterMismatchError(
                f"{path}: the DoRA magnitude is {_checks.found(m)}; expected a float array to save"
            )
        f = table[path]
        want = expected_shape(tuple(f.b.shape), f.a.ndim - 1 - f.layout.fan_in_ndim)
        if tuple(m.shape) != want:
            raise AdapterMismatchError(
                f"{path}: the DoRA magnitude has shape {tuple(m.shape)} but the adapter's b "
                f"{tuple(f.b.shape)} gives {want} (*stack, *fan_out); were these magnitudes made "
                "for other adapters?"
            )
        out[path] = m
    return out


def sharding_of(b_sharding: Any, n_stack: int) -> Any:
    """A magnitude's sharding from its ``b``'s: the same mesh, ``b``'s spec without the rank axis.

    Any other sharding (one device) is returned as it is.
    """
    if not isinstance(b_sharding, jax.sharding.NamedSharding):
        return b_sharding
    spec = tuple(b_sharding.spec)
    spec = spec[:n_stack] + spec[n_stack + 1 :]
    return jax.sharding.NamedSharding(b_sharding.mesh, jax.sharding.PartitionSpec(*spec))


def refuse_unasked(where: str, paths: list[str]) -> None:
    """Raises: a checkpoint holding magnitudes restored without ``magnitudes=True``."""
    raise AdapterMismatchError(
        f"{where}: this checkpoint holds DoRA magnitudes for {len(paths)} weights ({paths[0]}, "
        "...); restoring its factors alone would turn the DoRA adapter into plain LoRA. Pass "
        "magnitudes=True to jlora.checkpoint.restore, which then returns (adapters, config, "
        "magnitudes); merge them with jlora.variants.dora_merge"
    )
