"""Sharding of NNX factors: metadata derived from the weight's, placement as Flax places variables.

A weight created with sharding metadata (``nnx.with_partitioning(init, ('embed', 'mlp'))``,
``kernel_metadata={'out_sharding': ...}``) holds one axis name (or ``None``, or a tuple of names)
per weight axis. Its factors get the names by role, as the functional core derives
PartitionSpecs (:mod:`jlora.sharding`) and as :func:`jlora.init` boxes the factors of Linen boxed
params:

    a: (*stack, *fan_in, rank)  ->  (*stack names, *fan_in names, rank name)
    b: (*stack, rank, *fan_out) ->  (*stack names, rank name, *fan_out names)

The rank name is :data:`jlora.sharding.RANK_AXIS` (``"lora_rank"``) when the names are logical,
i.e. logical-axis rules are in effect (``nnx.logical_axis_rules`` / ``nn.logical_axis_rules``, or
the weight's own ``sharding_rules``); the factors then carry the rule ``("lora_rank", None)`` in
their ``sharding_rules``, since in NNX an unmapped logical name would pass through to the mesh
unchanged. It is ``None`` for mesh-axis names (no rules). Either way the rank axis is replicated:
every device needs the whole rank-``r`` product ``x a``. ``nnx.get_partition_spec``,
``nnx.get_named_sharding`` and the optimizer's moments (``nnx.Optimizer`` copies a variable's
metadata) then shard the factors with the user's own rules.

Placement follows Flax: a variable with sharding metadata and ``eager_sharding`` is created on its
sharding under the active mesh (``jax.set_mesh``), or the ``mesh`` in its metadata; when neither is
there but the weight itself lies on a mesh, the factors are placed on that mesh. A weight with no
sharding metadata but a concrete ``NamedSharding`` gets factors on the derived ``NamedSharding`` s.

Flax has stored the names under ``out_sharding`` since 0.12 (``sharding`` and ``sharding_names``
are remapped to it with a DeprecationWarning); the factors use whichever key the weight has.

In Explicit sharding mode (``jax.sharding.AxisType.Explicit``) the LoRA term runs with the mesh
axes Auto and comes out typed like the layer's output (:func:`explicit_out_like`).

Example:
    >>> import jax
    >>> from flax import nnx
    >>> import jlora, jlora.nnx
    >>> mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
    >>> init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    >>> with jax.set_mesh(mesh), nnx.logical_axis_rules((("embed", "data"), ("mlp", "model"))):
    ...     layer = nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))
    ...     layer = jlora.nnx.lora(layer, jlora.LoraConfig(targets="kernel", rank=2), rngs=1)
    >>> layer.lora_a.get_metadata()["out_sharding"], layer.lora_b.get_metadata()["out_sharding"]
    (('embed', 'lora_rank'), ('lora_rank', 'mlp'))
    >>> tuple(layer.lora_a[...].sharding.spec), tuple(layer.lora_b[...].sharding.spec)
    (('data', None), (None, 'model'))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from .._errors import AdapterMismatchError, TargetError
from .._factors import RANK_AXIS
from .._layout import Layout

KEYS = ("out_sharding", "sharding_names", "sharding")  # newest first


def sharding_key(metadata: dict[str, Any]) -> str | None:
    """The metadata key holding a variable's sharding names, or None if it has none."""
    return next((k for k in KEYS if metadata.get(k)), None)


def _rules(metadata: dict[str, Any]) -> tuple[tuple[Any, Any], ...]:
    return (
        *tuple(spmd.get_logical_axis_rules() or ()),
        *tuple(metadata.get("sharding_rules") or ()),
    )


def _check_rank_rule(path: str, rules: tuple[tuple[Any, Any], ...]) -> None:
    for alias, target in rules:
        if alias == RANK_AXIS and target is not None:
            raise AdapterMismatchError(
                f"{path}: a logical-axis rule maps the LoRA rank axis {RANK_AXIS!r} to mesh axis "
                f"{target!r}, which would shard the rank of lora_a and lora_b; the rank axis must "
                "be replicated, since every device needs the whole rank-r product x a. Remove the "
                f"rule or map {RANK_AXIS!r} to None (jlora.sharding.check_factor_shardings checks "
                "factor shardings made by hand)"
            )


def _by_role(entries: tuple[Any, ...], layout: Layout, rank: Any) -> tuple[tuple, tuple]:
    stack, fan_in, fan_out = layout.split(entries)
    return (*stack, *fan_in, rank), (*stack, rank, *fan_out)


def _like(names: Any, derived: tuple[Any, ...]) -> Any:
    """``derived`` in the container type the weight's names came in."""
    if isinstance(names, NamedSharding):
        return NamedSharding(names.mesh, PartitionSpec(*derived))
    if isinstance(names, PartitionSpec):
        return PartitionSpec(*derived)
    return type(names)(derived) if isinstance(names, list) else derived


def factor_metadata(weight: Any, layout: Layout, path: str) -> tuple[dict, dict]:
    """Sharding metadata for ``a`` and ``b`` derived from ``weight``'s (empty dicts if none).

    Raises:
        TargetError: the weight's names are not a sequence, or their number differs from the
            weight's number of axes.
        AdapterMismatchError: a logical-axis rule in effect shards the rank axis.
    """
    meta = weight.get_metadata()
    key = sharding_key(meta)
    if key is None:
        return {}, {}
    names = meta[key]
    entries = names.spec if isinstance(names, NamedSharding) else names
    shape = tuple(weight.shape)
    if not isinstance(entries, (tuple, list)):
        raise TargetError(
            f"{path}: the weight's sharding metadata {key}={names!r} is a "
            f"{type(names).__name__}; jlora derives factor shardings from a tuple of axis names "
            "(or a PartitionSpec or NamedSharding), one per weight axis"
        )
    if len(entries) != len(shape):
        raise TargetError(
            f"{path}: the weight's sharding metadata {key}={tuple(entries)!r} has "
            f"{len(entries)} axis names but the weight has {len(shape)} axes (shape {shape}); "
            "give one name (or None) per weight axis, in the weight's order (a stacked kernel "
            "(layers, in, out) needs a name for its layers axis too, as nnx.vmap's "
            "transform_metadata={nnx.PARTITION_NAME: ...} adds), so that each factor axis gets "
            "the name of the weight axis it comes from"
        )
    rules = _rules(meta)
    common = {k: meta[k] for k in ("mesh", "eager_sharding") if k in meta}
    rank = None
    if rules:  # logical names: the rank axis gets a name users may map (to None)
        _check_rank_rule(path, rules)
        rank = RANK_AXIS
        local = tuple(meta.get("sharding_rules") or ())
        if all(alias != RANK_AXIS for alias, _ in local):
            local = (*local, (RANK_AXIS, None))
        common["sharding_rules"] = local
    a, b = _by_role(tuple(entries), layout, rank)
    return {key: _like(names, a), **common}, {key: _like(names, b), **common}


def _concrete_mesh(value: Any) -> Any:
    """The mesh of a concrete array on a NamedSharding, else None."""
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def new_factor(
    cls: type, value: Any, metadata: dict[str, Any], weight_value: Any, role: str
) -> Any:
    """``cls(value, **metadata)``, placed as Flax places a new variable with this metadata.

    With sharding metadata and eager sharding, the variable is created under the active mesh (as
    Flax's own layers are), else under the mesh the weight lies on; with no mesh at all it keeps
    the metadata and is placed later (``nnx.get_partition_spec`` + a sharding constraint).
    Without sharding metadata, a factor of a weight on a ``NamedSharding`` is put on the derived
    sharding.
    """
    key = sharding_key(metadata)
    if key is None:
        return cls(
            _placed_like_weight(value, role, metadata["lora_layout"], weight_value), **metadata
        )
    if not metadata.get("eager_sharding", nnx.using_eager_sharding()):
        return cls(value, **metadata)
    if metadata.get("mesh") is not None or not jax.sharding.get_abstract_mesh().empty:
        return cls(value, **metadata)
    mesh = _concrete_mesh(weight_value)
    if mesh is None:  # Flax would refuse to create it, and the weight is on no mesh either
        plain = {k: v for k, v in metadata.items() if k != key}
        return cls(value, **plain).replace(**{key: metadata[key]})
    if not isinstance(value, jax.core.Tracer):
        # As if drawn under the mesh (Flax's constraint takes arrays on the mesh only).
        value = jax.device_put(value, NamedSharding(mesh, PartitionSpec()))
    with jax.set_mesh(mesh):
        return cls(value, **metadata)


def _placed_like_weight(value: Any, role: str, layout: Layout, weight_value: Any) -> Any:
    mesh = _concrete_mesh(weight_value)
    if mesh is None or isinstance(value, jax.core.Tracer):
        return value
    spec = tuple(weight_value.sharding.spec)
    spec = spec + (None,) * (weight_value.ndim - len(spec))
    a, b = _by_role(spec, layout, None)
    return jax.device_put(value, NamedSharding(mesh, PartitionSpec(*(a if role == "a" else b))))


def explicit_out_like(fn: Callable[..., Any], y: Any) -> Callable[..., Any]:
    """``fn``, or under a mesh with Explicit axes ``fn`` run with them Auto and its output typed
    like ``y``.

    In explicit sharding mode every op's output sharding is part of its type, and a contraction
    over a sharded axis (``x a`` with a fan-in sharded like the weight's) needs an
    ``out_sharding``; the layer's own call takes one from the user (``out_sharding=``), the LoRA
    term does not. The term is small (rank ``r`` inside), so it runs with the mesh axes Auto, as
    ``nnx.Embed`` does its lookup, and comes out sharded like the layer's output, which it is
    added to.
    """
    sharding = getattr(jax.typeof(y), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
        return fn
    return jax.sharding.auto_axes(fn, out_sharding=sharding)
