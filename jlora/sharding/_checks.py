"""Checks of factor shardings: mesh axes, even splits, and a replicated rank axis.

Used by the derivation (:func:`factor_shardings` with a mesh), by the logical-axis rules and by
checkpoint restores onto shardings; :func:`check_factor_shardings` is the public check of
shardings made some other way.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._errors import AdapterMismatchError
from .._merge import factors_by_path
from .._paths import leaves_with_paths


def _check_axes(where: str, spec: PartitionSpec, mesh: Mesh) -> None:
    for entry in spec:
        for axis in entry if isinstance(entry, tuple) else (entry,):
            if axis is not None and axis not in mesh.axis_names:
                raise AdapterMismatchError(
                    f"{where}: PartitionSpec {spec} names mesh axis {axis!r} but the mesh has axes "
                    f"{mesh.axis_names}; fix the spec or the mesh"
                )


def check_divides(where: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    """Raises :class:`AdapterMismatchError` if a sharded axis of ``shape`` does not split evenly."""
    for axis, entry in enumerate(spec):
        names = entry if isinstance(entry, tuple) else (entry,)
        parts = 1
        for name in names:
            if name is not None and name in mesh.shape:
                parts *= mesh.shape[name]
        if axis < len(shape) and shape[axis] % parts:
            raise AdapterMismatchError(
                f"{where}: PartitionSpec {spec} splits axis {axis} of shape {tuple(shape)} into "
                f"{parts} parts (mesh axes {entry!r}), which do not divide {shape[axis]}; choose "
                "mesh axes whose sizes divide it, or leave this axis replicated (None)"
            )


def _is_placement(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding | PartitionSpec) or x is None


def check_factor_shardings(adapters: Any, shardings: Any, mesh: Mesh | None = None) -> None:
    """Checks factor shardings made by hand (or by other rules) before they reach ``jax.jit``.

    Each factor needs a ``NamedSharding`` (or, with ``mesh``, a ``PartitionSpec``) with at most
    one entry per factor axis, naming only axes of its mesh, and leaving the rank axis (the last
    axis of ``a``, the first after the stack axes of ``b``) replicated. Shardings from
    :func:`factor_shardings` always pass.

    Args:
        adapters: the adapter pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).
        shardings: a pytree like ``adapters`` holding a sharding at each factor: ``LoraFactors``
            nodes of shardings (as :func:`factor_shardings` returns, or
            ``jax.tree.map(lambda x: x.sharding, adapters)``), or ``{"a": ..., "b": ...}`` dicts.
        mesh: the mesh for ``PartitionSpec`` leaves.

    Raises:
        AdapterMismatchError: a factor has no sharding, one of an unexpected type, a spec longer
            than the factor, an axis the mesh lacks, an axis the mesh axes do not divide, or a
            sharded rank axis. The message names the adapter path and the factor.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jlora
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
        >>> adapters = jlora.init(jax.random.key(0), {"w": jnp.zeros((8, 4))},
        ...                       jlora.LoraConfig(targets="w", rank=2))
        >>> check_factor_shardings(adapters, {"w": {"a": P("model", None), "b": P()}}, mesh)
        >>> check_factor_shardings(adapters, {"w": {"a": P(None, "model"), "b": P()}}, mesh)
        Traceback (most recent call last):
        ...
        jlora._errors.AdapterMismatchError: w: factor a has PartitionSpec P(None, 'model'), which shards the rank axis ...
    """
    given = {}
    for path, leaf in leaves_with_paths(shardings, is_leaf=_is_placement):
        owner, _, name = path.rpartition("/")
        if name in ("a", "b"):
            given[(owner, name)] = leaf
    for path, f in factors_by_path(adapters).items():
        rank_axis = {"a": f.a.ndim - 1, "b": f.b.ndim - 1 - f.layout.fan_out_ndim}
        for name in ("a", "b"):
            if (path, name) not in given:
                raise AdapterMismatchError(
                    f"{path}: factor {name} has no sharding in shardings; expected a tree like the "
                    "adapters with a sharding at every factor, e.g. "
                    "jlora.sharding.factor_shardings(adapters, param_shardings)"
                )
            where = f"{path}: factor {name}"
            _check_factor(where, getattr(f, name), given[(path, name)], mesh, rank_axis[name])


def _check_factor(where: str, x: Any, placement: Any, mesh: Mesh | None, rank_axis: int) -> None:
    if isinstance(placement, NamedSharding):
        spec, mesh = placement.spec, placement.mesh
    elif isinstance(placement, PartitionSpec):
        if mesh is None:
            raise AdapterMismatchError(
                f"{where}: PartitionSpec {placement} needs a mesh; pass mesh= or a NamedSharding"
            )
        spec = placement
    else:
        raise AdapterMismatchError(
            f"{where}: expected a NamedSharding or, with mesh=, a PartitionSpec; found "
            f"{type(placement).__name__}"
        )
    if len(spec) > x.ndim:
        raise AdapterMismatchError(
            f"{where} has PartitionSpec {spec} with {len(spec)} entries but only {x.ndim} axes "
            f"(shape {tuple(x.shape)}); give at most one entry per axis"
        )
    _check_axes(where, spec, mesh)
    entry = spec[rank_axis] if rank_axis < len(spec) else None
    if entry is not None:
        raise AdapterMismatchError(
            f"{where} has PartitionSpec {spec}, which shards the rank axis (axis {rank_axis} of "
            f"shape {tuple(x.shape)}) over mesh axis {entry!r}; the rank axis must be replicated, "
            "since every device needs the whole rank-r product x a. Derive factor shardings from "
            "the base weights' with jlora.sharding.factor_shardings"
        )
    check_divides(where, tuple(x.shape), spec, mesh)
