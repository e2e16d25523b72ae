"""Factor shardings from logical axis names (Linen's ``nn.with_logical_partitioning``)."""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._errors import AdapterMismatchError
from .._extras import Trainable
from .._factors import RANK_AXIS, LoraFactors
from .._paths import is_box, leaves_with_paths, nest, unbox
from ._checks import _check_axes, check_divides


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
