"""Factor PartitionSpecs and NamedShardings derived from the base weights' (see the package)."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._errors import AdapterMismatchError
from .._extras import Trainable
from .._factors import LoraFactors
from .._merge import adapter_tables, factors_by_path
from .._paths import leaves_with_paths, nest
from ._checks import _check_axes, check_divides


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec) or x is None


def _spec_pair(path: str, spec: PartitionSpec | None, f: LoraFactors) -> tuple[PartitionSpec, ...]:
    ndim = f.a.ndim - 1 + f.layout.fan_out_ndim
    entries = tuple(spec) if spec is not None else ()
    if len(entries) > ndim:
        raise AdapterMismatchError(
            f"{path}: PartitionSpec {spec} has {len(entries)} entries but the weight has {ndim} "
            f"axes (a {f.a.shape}, b {f.b.shape}); give at most one entry per weight axis"
        )
    entries = entries + (None,) * (ndim - len(entries))
    stack, fan_in, fan_out = f.layout.split(entries)
    return PartitionSpec(*stack, *fan_in, None), PartitionSpec(*stack, None, *fan_out)


def factor_specs(adapters: Any, param_specs: Any) -> Any:
    """PartitionSpecs for each factor, from the specs of the weights they adapt.

    Args:
        adapters: an adapter pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).
        param_specs: a pytree like the base params (at least at the adapted paths) holding a
            ``PartitionSpec`` (or None, replicated) per weight, e.g. ``nn.get_partition_spec``'s
            output or ``jax.tree.map(lambda x: x.sharding.spec, params)``.

    Returns:
        A pytree like ``adapters`` whose ``a`` and ``b`` leaves are PartitionSpecs; each trainable
        extra holds its weight's spec (``PartitionSpec()`` for None).

    Raises:
        AdapterMismatchError: an adapted path has no spec in ``param_specs``, or a spec has more
            entries than its weight has axes.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> params = {"up": {"kernel": jnp.zeros((8, 32))}}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets=".*kernel"))
        >>> specs = factor_specs(adapters, {"up": {"kernel": P("data", "model")}})
        >>> tuple(specs["up"]["kernel"].a), tuple(specs["up"]["kernel"].b)
        (('data', None), (None, 'model'))
    """
    specs = dict(leaves_with_paths(param_specs, is_leaf=_is_spec))
    out = {}
    table, extras = adapter_tables(adapters)
    for path in [*table, *extras]:
        if path not in specs:
            raise AdapterMismatchError(
                f"{path}: no PartitionSpec for this adapted weight in param_specs; expected a tree "
                "like the base params with a spec (or None) at every adapted weight"
            )
    for path, f in table.items():
        a_spec, b_spec = _spec_pair(path, specs[path], f)
        out[path] = LoraFactors(a_spec, b_spec, f.scale, f.layout)
    for path in extras:
        out[path] = Trainable(PartitionSpec() if specs[path] is None else specs[path])
    return nest(out)


def factor_shardings(adapters: Any, param_shardings: Any, mesh: Mesh | None = None) -> Any:
    """NamedShardings for each factor, on the mesh of the weight it adapts.

    Args:
        adapters: an adapter pytree (arrays or abstract).
        param_shardings: a pytree like the base params holding a ``NamedSharding`` per adapted
            weight (e.g. ``jax.tree.map(lambda x: x.sharding, params)``), or, with ``mesh``, a
            ``PartitionSpec`` per adapted weight.
        mesh: the mesh for PartitionSpec leaves.

    Returns:
        A pytree like ``adapters`` whose ``a`` and ``b`` leaves are NamedShardings; each trainable
        extra holds its weight's sharding.

    Raises:
        AdapterMismatchError: an adapted weight has no NamedSharding (or no PartitionSpec with
            ``mesh``), a spec names a mesh axis the mesh lacks, or does not fit the weight.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jlora
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
        >>> params = {"up": {"kernel": jnp.zeros((8, 32))}}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets=".*kernel"))
        >>> s = factor_shardings(adapters, {"up": {"kernel": P(None, "model")}}, mesh)
        >>> tuple(s["up"]["kernel"].b.spec)
        (None, 'model')
    """
    if mesh is not None:
        specs = factor_specs(adapters, param_shardings)
        table, extras = adapter_tables(specs)
        shapes = factors_by_path(adapters)
        for path, f in table.items():
            for name, spec in (("a", f.a), ("b", f.b)):
                _check_axes(path, spec, mesh)
                shape = tuple(getattr(shapes[path], name).shape)
                check_divides(f"{path}: factor {name}", shape, spec, mesh)
        for path, e in extras.items():
            _check_axes(path, e.value, mesh)
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    table = dict(
        leaves_with_paths(param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    )
    out = {}
    for path, f in factors_by_path(adapters).items():
        sharding = table.get(path)
        if not isinstance(sharding, NamedSharding):
            raise AdapterMismatchError(
                f"{path}: expected a NamedSharding for this adapted weight, found "
                f"{type(sharding).__name__}; put the base on a Mesh with NamedSharding, or pass "
                "PartitionSpecs with mesh="
            )
        a_spec, b_spec = _spec_pair(path, sharding.spec, f)
        mesh_ = sharding.mesh
        out[path] = LoraFactors(
            NamedSharding(mesh_, a_spec), NamedSharding(mesh_, b_spec), f.scale, f.layout
        )
    for path in adapter_tables(adapters)[1]:
        sharding = table.get(path)
        if not isinstance(sharding, jax.sharding.Sharding):
            raise AdapterMismatchError(
                f"{path}: expected a sharding for this trainable extra's weight, found "
                f"{type(sharding).__name__}; give param_shardings a sharding at every extra too"
            )
        out[path] = Trainable(sharding)
    return nest(out)
