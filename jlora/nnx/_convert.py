"""Between an adapted NNX model and the functional world: factor state and adapters (the merged
model: :mod:`jlora.nnx._merge`).

An adapted layer's factors live in :class:`LoraParam` variables ``lora_a``/``lora_b`` whose metadata
holds the static ``scale``, ``layout`` and adapted attribute, so a factor state alone converts to
:class:`jlora.LoraFactors` at the weight's path (``<module path>/<weight>``), the same path the
weight has in ``nnx.state(model, nnx.Param)``. Trainable extras are the model's own marked
``nnx.Param`` s (:mod:`jlora.nnx._extras`) and convert to :class:`jlora.Trainable` at their paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from .._errors import AdapterMismatchError
from .._extras import Trainable, check_extra_fit
from .._factors import LoraFactors
from .._merge import adapter_tables
from .._paths import nest
from .._weight_merge import check_fit
from ..variants._dora_layers import MAGNITUDE
from ._adapted import LoraParam, weight_of
from ._extras import TRAINABLE, is_extra
from ._sharding import new_factor

Parts = tuple[Any, ...]


def check_module(model: Any, where: str) -> None:
    """Raises ``TypeError`` unless ``model`` is an ``nnx.Module``."""
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"jlora.nnx.{where}: expected a flax.nnx.Module, got {type(model).__name__}. For a "
            "flax.linen module use jlora.linen; for a parameter pytree use jlora.init / jlora.merge"
        )


def flat_variables(state: Any) -> list[tuple[Parts, Any]]:
    """``[(path parts, Variable), ...]`` of a state, in order (keys as NNX has them: str or int)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), v) for p, v in flat]


def join(parts: Parts) -> str:
    """Path parts as the functional core writes paths: ``blocks/0/attn/query/kernel``."""
    return "/".join(str(p) for p in parts)


def node(root: Any, parts: Parts) -> Any:
    """The object at ``parts`` below ``root`` (attributes of modules, items of lists and dicts)."""
    current = root
    for key in parts:
        if isinstance(current, Mapping) or isinstance(key, int):
            current = current[key]
        else:
            current = getattr(current, key)
    return current


def adapted(model: Any) -> dict[str, tuple[Parts, Any]]:
    """``{weight path: (module path parts, module)}`` for every adapted layer of ``model``."""
    out = {}
    for parts, var in flat_variables(nnx.state(model, LoraParam)):
        if parts[-1] == "lora_a":
            module = node(model, parts[:-1])
            out[join((*parts[:-1], var.get_metadata()["lora_weight"]))] = (parts[:-1], module)
    return out


def extras_of(model: nnx.Module) -> dict[str, Any]:
    """``{path: nnx.Param}`` of the trainable extras of ``model``, in order."""
    return {join(parts): var for parts, var in flat_variables(nnx.state(model, is_extra))}


def to_adapters(source: nnx.Module | Any) -> dict[str, Any]:
    """The functional adapter pytree (as :func:`jlora.init` makes) of a model or factor state.

    Args:
        source: an adapted ``nnx.Module``, or a state holding its :class:`LoraParam` variables
            (``nnx.state(model, LoraParam)``, ``nnx.state(model, jlora.nnx.TRAINABLE)``, or the
            factor state of ``nnx.split``).

    Returns:
        A nested dict with a :class:`jlora.LoraFactors` at each adapted weight path and a
        :class:`jlora.Trainable` at each trainable extra (a marked ``nnx.Param``), sharing the
        model's arrays, so ``jlora.merge(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        to_adapters(model))`` is the merged parameter tree.

    Raises:
        AdapterMismatchError: the state holds one factor of a pair without the other.

    Example:
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> model = jlora.nnx.lora(
        ...     nnx.Linear(6, 4, rngs=nnx.Rngs(0)), jlora.LoraConfig(targets="kernel", rank=2), rngs=0
        ... )
        >>> to_adapters(model)["kernel"].a.shape
        (6, 2)
    """
    state = nnx.state(source, TRAINABLE) if isinstance(source, nnx.Module) else source
    pairs: dict[Parts, dict[str, Any]] = {}
    table: dict[str, Any] = {}
    for parts, var in flat_variables(state):
        if isinstance(var, LoraParam) and parts[-1] == MAGNITUDE:
            continue  # DoRA's magnitude: jlora.variants.nnx_magnitudes
        if isinstance(var, LoraParam):
            pairs.setdefault(parts[:-1], {})[parts[-1]] = var
        elif is_extra(parts, var):
            table[join(parts)] = Trainable(var.get_value())
    for owner, pair in pairs.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise AdapterMismatchError(
                f"{join(owner)}: the state holds {sorted(pair)} but an adapter needs both "
                "'lora_a' and 'lora_b'; take the state with nnx.state(model, jlora.nnx.LoraParam)"
            )
        meta = pair["lora_a"].get_metadata()
        table[join((*owner, meta["lora_weight"]))] = LoraFactors(
            pair["lora_a"].get_value(),
            pair["lora_b"].get_value(),
            meta["lora_scale"],
            meta["lora_layout"],
        )
    return nest(table)


def to_state(model: nnx.Module, adapters: Any) -> Any:
    """The :class:`LoraParam` state of ``model`` with the factors of ``adapters`` in it.

    The result has the structure of ``nnx.state(model, jlora.nnx.TRAINABLE)`` (that is
    ``nnx.state(model, LoraParam)`` plus the trainable extras, if any), for ``nnx.update(model,
    state)`` or ``nnx.merge(graphdef, state, rest)``. The adapters may differ from the model's in
    rank, scale and dtype, but must cover exactly its adapted weights, with their layouts, and
    exactly its trainable extras, with their shapes and dtypes.

    Args:
        model: an adapted ``nnx.Module``; its own factors may be abstract (``jax.ShapeDtypeStruct``
            values, as ``nnx.eval_shape`` makes), since only their metadata is read.
        adapters: functional adapters for it (from :func:`jlora.init`, :func:`to_adapters`,
            training, or a checkpoint).

    Returns:
        The factor state.

    Raises:
        AdapterMismatchError: an adapter has no adapted layer at its path, an adapted layer has no
            adapter, or factors do not fit their weight; the extras differ from the model's in
            paths, shapes or dtypes.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> model = jlora.nnx.lora(
        ...     nnx.Linear(6, 4, rngs=nnx.Rngs(0)), jlora.LoraConfig(targets="kernel", rank=2), rngs=0
        ... )
        >>> ones = jax.tree.map(jax.numpy.ones_like, to_adapters(model))
        >>> float(to_state(model, ones)["lora_b"].get_value().sum())
        8.0
    """
    check_module(model, "to_state")
    table, extras = adapter_tables(adapters)
    layers = adapted(model)
    marked = extras_of(model)
    for path in [*extras, *marked]:
        if (path in extras) != (path in marked):
            where = "the adapters but not the model" if path in extras else "the model only"
            raise AdapterMismatchError(
                f"{path}: a trainable extra at this path is in {where}; the model's extras are "
                f"{list(marked)[:8]}. Make the model with jlora.nnx.lora and the same config's "
                "trainable, or the adapters with jlora.nnx.to_adapters(model)"
            )
        check_extra_fit(path, marked[path].get_value(), extras[path])
    for path in table:
        if path not in layers:
            raise AdapterMismatchError(
                f"{path}: the adapters have factors here but the model has no adapted layer at "
                f"this path (adapted: {sorted(layers)[:8]}). Were these adapters made for "
                "another model or config?"
            )
    for path, (_, module) in layers.items():
        if path not in table:
            raise AdapterMismatchError(
                f"{path}: the model has an adapted layer here but the adapters have no factors "
                "for it; pass adapters for every adapted layer (jlora.nnx.to_adapters(model) "
                "lists them)"
            )
        # The layer's layout from its metadata: its factor values may be abstract (a model from
        # nnx.eval_shape, to restore a checkpoint into).
        factors, own = table[path], module.lora_a.get_metadata()["lora_layout"]
        if factors.layout != own:
            raise AdapterMismatchError(
                f"{path}: adapter layout {factors.layout} differs from the layer's {own}; "
                "were these adapters made for another model?"
            )
        check_fit(path, weight_of(module).get_value(), factors)

    def replace(key_path: Any, var: Any) -> Any:
        parts = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)
        if not isinstance(var, LoraParam):
            return var.replace(extras[join(parts)].value)
        if parts[-1] == MAGNITUDE:
            return var  # DoRA's magnitude is not part of the adapter pytree
        path = join((*parts[:-1], var.get_metadata()["lora_weight"]))
        factors, role = table[path], parts[-1][-1]
        value = factors.a if role == "a" else factors.b
        meta = {**var.get_metadata(), "lora_scale": factors.scale, "lora_layout": factors.layout}
        weight = weight_of(layers[path][1]).get_value()
        return new_factor(LoraParam, value, meta, weight, role)

    return jax.tree_util.tree_map_with_path(
        replace, nnx.state(model, TRAINABLE), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def set_adapters(model: nnx.Module, adapters: Any) -> None:
    """Loads functional adapters into an adapted model in place (validated :func:`to_state`).

    Args:
        model: an adapted ``nnx.Module``.
        adapters: adapters covering exactly its adapted weights.

    Raises:
        AdapterMismatchError: as :func:`to_state`.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> model = jlora.nnx.lora(
        ...     nnx.Linear(6, 4, rngs=nnx.Rngs(0)), jlora.LoraConfig(targets="kernel", rank=2), rngs=0
        ... )
        >>> set_adapters(model, jax.tree.map(jax.numpy.ones_like, to_adapters(model)))
        >>> float(model.lora_a.get_value().sum())
        12.0
    """
    nnx.update(model, to_state(model, adapters))
