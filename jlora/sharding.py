"""Shardings for adapter factors, derived from the base weights' shardings.

A weight ``W0: (*stack, *fan_in, *fan_out)`` sharded by ``PartitionSpec(*s, *i, *o)`` gives (for
a weight whose axes come in another order, e.g. layout ``"oio"``, each entry goes with its axis)

    a: (*stack, *fan_in, r)   ->  PartitionSpec(*s, *i, None)
    b: (*stack, r, *fan_out)  ->  PartitionSpec(*s, None, *o)

so ``x a`` contracts ``a`` exactly as ``x W0`` contracts ``W0`` (same collectives on the same mesh
axes), ``(x a) b`` produces outputs laid out like ``x W0``'s, and the rank axis, which is tiny, is
replicated. Stack axes (scanned layers, experts) follow the base. Nothing here gathers or
replicates a base weight: ``init`` creates each factor directly on its sharding.

A trainable extra (:class:`jlora.Trainable`, a fully trained copy of a base leaf) takes its base
leaf's sharding unchanged.

Factor shardings built some other way (logical-axis rules, a checkpoint's metadata) can be checked
with :func:`check_factor_shardings`: the rank axis must stay replicated, since every device needs
the whole rank-``r`` intermediate ``x a``. Factors boxed with logical names (Linen models built
with ``nn.with_logical_partitioning``) get theirs from the user's ``logical_axis_rules`` through
:func:`logical_factor_shardings`, which checks the names, the rules and the mesh on the way.

Explicit sharding (``AxisType.Explicit`` meshes, ``jax.set_mesh``) needs nothing more here: the
shardings are the same NamedShardings, and ``init`` creates the factors on them, typed.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._config import LoraConfig
from ._errors import AdapterMismatchError
from ._extras import Trainable
from ._factors import RANK_AXIS, LoraFactors, draw, with_extras
from ._merge import adapter_tables, factors_by_path
from ._paths import is_box, leaves_with_paths, nest, unbox
from ._targets import select

__all__ = [
    "RANK_AXIS",
    "check_factor_shardings",
    "factor_shardings",
    "factor_specs",
    "init",
    "logical_factor_shardings",
]


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


def init(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    param_shardings: Any | None = None,
    *,
    mesh: Mesh | None = None,
) -> Any:
    """Like :func:`jlora.init`, but creates each factor directly on its sharding.

    Each factor is drawn by a jitted computation whose output is laid out by
    :func:`factor_shardings`: no host round trip and no full replica of anything.

    Args:
        key: a PRNG key.
        params: the base params: sharded arrays, or abstract leaves when ``param_shardings`` is given.
        config: which weights to adapt and how.
        param_shardings: a pytree like ``params`` of NamedShardings (or, with ``mesh``,
            PartitionSpecs); by default each array's own ``.sharding``.
        mesh: the mesh for PartitionSpec leaves of ``param_shardings``.

    Returns:
        The adapter pytree, equal to ``jlora.init(key, params, config)``, sharded (trainable
        extras are copies of the base leaves, on their shardings).

    Raises:
        AdapterMismatchError: as for :func:`factor_shardings`.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jlora
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
        >>> w = jax.device_put(jnp.zeros((8, 32)), NamedSharding(mesh, P("data", "model")))
        >>> adapters = init(jax.random.key(0), {"w": w}, jlora.LoraConfig(targets="w"))
        >>> tuple(adapters["w"].a.sharding.spec), tuple(adapters["w"].b.sharding.spec)
        (('data', None), (None, 'model'))
    """
    if param_shardings is None:
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
    targets = select(params, config)
    abstract = jax.eval_shape(lambda k: draw(k, targets, config), key)
    shardings = factor_shardings(abstract, param_shardings, mesh)
    table = {path: (f.a, f.b) for path, f in factors_by_path(shardings).items()}
    return with_extras(draw(key, targets, config, shardings=table), params, config)


def logical_factor_shardings(adapters: Any, mesh: Mesh, rules: Any | None = None) -> Any:
    """NamedShardings for boxed factors, from their axis names and the logical-axis rules.

    For adapters of a Linen model built with ``nn.with_logical_partitioning`` (factors boxed with
    names derived from their weight's, see :data:`RANK_AXIS`), this is Flax's
    ``nn.logical_to_mesh_sharding(nn.get_partition_spec(adapters), mesh, rules)`` with the
    checks Flax leaves out: Flax replicates an axis whose logical name has no rule, silently, and
    lets a rule shard the rank axis. Factors boxed with mesh-axis names (``nn.Partitioned``) take
    their names as the spec. Needs Flax.

    Args:
        adapters: an adapter pytree whose factors are boxed (``jlora.init`` or
            ``jlora.linen.LoraModel.init_adapters`` on boxed params).
        mesh: the mesh to shard over.
        rules: ``((logical name, mesh axis or tuple or None), ...)``; by default the rules of the
            enclosing ``nn.logical_axis_rules`` context. A rule to None replicates on purpose.

    Returns:
        A pytree like ``adapters`` of plain ``LoraFactors`` holding NamedShardings (and a
        NamedSharding in each boxed trainable extra), ready for ``jax.device_put`` of the
        unboxed adapters or ``jax.jit``'s shardings.

    Raises:
        AdapterMismatchError: naming the path and factor, when a factor is not boxed, has more
            names than axes, a logical name (other than ``RANK_AXIS``) has no rule, a rule shards
            the rank axis, a mesh axis is not in ``mesh``, or a split does not divide its axis.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, jlora
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
        >>> params = {"up": {"kernel": nn.LogicallyPartitioned(jnp.zeros((8, 16)), ("embed", "mlp"))}}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="up/kernel"))
        >>> rules = (("embed", None), ("mlp", "model"))
        >>> s = logical_factor_shardings(adapters, mesh, rules)
        >>> tuple(s["up"]["kernel"].a.spec), tuple(s["up"]["kernel"].b.spec)
        ((None, None), (None, 'model'))
        >>> logical_factor_shardings(adapters, mesh, (("embed", None),))
        Traceback (most recent call last):
        ...
        jlora._errors.AdapterMismatchError: up/kernel: factor b has logical axis name 'mlp' ...
    """
    from flax.linen import spmd  # the one function of jlora.sharding that needs Flax

    if rules is None:
        rules = spmd.get_logical_axis_rules()
    rules = tuple(tuple(rule) for rule in rules)
    out = {}
    for path, node in leaves_with_paths(
        adapters, is_leaf=lambda x: isinstance(x, LoraFactors | Trainable)
    ):
        if isinstance(node, Trainable):
            out[path] = Trainable(
                _box_sharding(f"{path}: trainable extra", node.value, mesh, rules, None)
            )
            continue
        if not isinstance(node, LoraFactors):
            raise AdapterMismatchError(
                f"{path}: adapter tree holds a {type(node).__name__}, not LoraFactors or "
                "jlora.Trainable; expected the output of jlora.init"
            )
        rank_axis = {"a": -1, "b": unbox(node.b).ndim - 1 - node.layout.fan_out_ndim}
        a, b = (
            _box_sharding(
                f"{path}: factor {name}", getattr(node, name), mesh, rules, rank_axis[name]
            )
            for name in ("a", "b")
        )
        out[path] = LoraFactors(a, b, node.scale, node.layout)
    return nest(out)


def _box_sharding(where: str, box: Any, mesh: Mesh, rules: tuple, rank_axis: int | None) -> Any:
    from flax.linen import spmd

    if not is_box(box) or getattr(box, "names", None) is None:
        raise AdapterMismatchError(
            f"{where} is a plain {type(box).__name__}, not boxed with axis names; "
            "logical_factor_shardings reads the boxes of adapters made from a model built with "
            "nn.with_logical_partitioning. For plain adapters derive the shardings from the base's: "
            "jlora.sharding.factor_shardings(adapters, param_shardings)"
        )
    shape = tuple(unbox(box).shape)
    names = tuple(box.names)
    if len(names) > len(shape):
        raise AdapterMismatchError(
            f"{where} has {len(names)} axis names {names} but {len(shape)} axes (shape {shape}); "
            "give one name (or None) per axis"
        )
    if not hasattr(box, "rules"):  # nn.Partitioned: the names are mesh axes
        spec = PartitionSpec(*names)
    else:
        known = {rule[0] for rule in rules}
        for name in names:
            if name is not None and name != RANK_AXIS and name not in known:
                raise AdapterMismatchError(
                    f"{where} has logical axis name {name!r} (names {names}), which no rule "
                    f"maps; the rules name {sorted(known)}. Add a rule ({name!r}, <mesh axis>) "
                    f"to logical_axis_rules, or ({name!r}, None) to replicate it"
                )
        for name, target in rules:
            if name == RANK_AXIS and target is not None and rank_axis is not None:
                raise AdapterMismatchError(
                    f"{where}: the rule ({RANK_AXIS!r}, {target!r}) shards the rank axis; the "
                    "rank axis must be replicated, since every device needs the whole rank-r "
                    f"product x a. Remove the rule or map {RANK_AXIS!r} to None"
                )
        spec = spmd.logical_to_mesh_axes(names, rules)
        for name, entry in zip(names, spec, strict=False):
            for axis in entry if isinstance(entry, tuple) else (entry,):
                if axis is not None and axis not in mesh.axis_names:
                    raise AdapterMismatchError(
                        f"{where}: logical axis {name!r} maps to mesh axis {axis!r} (rules "
                        f"{rules}) but the mesh has axes {mesh.axis_names}; fix the rule or the "
                        "mesh"
                    )
    if rank_axis is not None:
        entries = (*spec, *(None,) * (len(shape) - len(spec)))
        if entries[rank_axis] is not None:
            raise AdapterMismatchError(
                f"{where} names mesh axis {entries[rank_axis]!r} at its rank axis; the rank axis "
                "must be replicated (None), since every device needs the whole rank-r product x a"
            )
    _check_axes(where, spec, mesh)
    check_divides(where, shape, spec, mesh)
    return NamedSharding(mesh, spec)
