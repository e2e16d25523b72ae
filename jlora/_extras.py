"""Trainable extras: base leaves trained in full beside the adapters (PEFT's ``modules_to_save``).

A classifier head, or an embedding table resized for new tokens, has no pretrained value worth
keeping low-rank: it must train fully. ``LoraConfig(trainable=("classifier/.*",))`` selects such
leaves; :func:`jlora.init` puts a copy of each in the adapter tree at its own path, wrapped in a
:class:`Trainable` node, and :func:`jlora.merge` (and every transform) uses that copy *in place of*
the base's leaf. The base tree itself stays frozen and untouched.

Why a node and not the bare array: in a tree that holds both the frozen base and the adapters (one
combined tree for optax), a tree-map sees only types, so the node is what tells "train this" from
"frozen" (:mod:`jlora.optim`), and it is what tells a checkpoint, a PEFT file or an NNX model which
arrays replace base weights rather than add a low-rank update to them.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax
import jax.numpy as jnp

from ._config import LoraConfig, trainable_matches
from ._errors import AdapterMismatchError, NotAnArrayError, TargetError
from ._paths import leaves_with_paths


@dataclasses.dataclass(frozen=True)
class Trainable:
    """A base leaf trained in full, held in the adapter tree at the leaf's own path.

    Its one pytree leaf is ``value``, an array of the base leaf's shape and dtype, which replaces
    the base's leaf wherever the adapters are applied (``jlora.merge``, ``jlora.linen``,
    ``jlora.nnx``). Gradients with respect to an adapter tree hold ``Trainable`` nodes too.

    Attributes:
        value: the trained array, shaped and typed like the base leaf it replaces.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"dense": {"kernel": jnp.ones((4, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
        >>> config = jlora.LoraConfig(targets="dense/kernel", rank=2, trainable=("head/.*",))
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> adapters["head"]["kernel"].value.shape
        (3, 2)
        >>> jax.tree.leaves(jax.tree.map(jnp.shape, adapters["head"]))
        [3, 2]
    """

    value: jax.Array


jax.tree_util.register_dataclass(Trainable, data_fields=["value"], meta_fields=[])


def is_trainable(x: Any) -> bool:
    """Whether ``x`` is a :class:`Trainable` node."""
    return isinstance(x, Trainable)


def _closest(pattern: str, paths: list[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)


def check_trainable_paths(
    paths: list[str], config: LoraConfig, adapted: set[str] | None = None
) -> list[str]:
    """The paths ``config.trainable`` selects, validated: each pattern matches, none is adapted.

    ``adapted`` is the set of paths that get adapters (by default those ``config`` selects; the
    Flax transforms pass the weights they actually adapt, e.g. ``"all-linear"`` spares the head).

    Raises:
        TargetError: a pattern matches no path (the message lists the closest), or a path is both
            targeted for LoRA and trainable.
    """
    for pattern in config.trainable:
        if not any(trainable_matches(pattern, p) for p in paths):
            raise TargetError(
                f"trainable {pattern!r} matches no parameter path (patterns must match the whole "
                f"'/'-joined path; module names match at any depth). Closest paths: "
                f"{_closest(pattern, paths)}. Fix the pattern, e.g. 'classifier' (every leaf of "
                "each module named classifier) or 'classifier/.*'"
            )
    selected = [p for p in paths if config.is_trainable(p)]
    both = [p for p in selected if (config.selects(p) if adapted is None else p in adapted)]
    if both:
        raise TargetError(
            f"{both[0]}: selected both by targets (a LoRA adapter) and by trainable (trained in "
            f"full); a weight is one or the other ({len(both)} such paths). Add it to "
            "LoraConfig.exclude to train it in full, or narrow trainable"
        )
    return selected


def select_extras(params: Any, config: LoraConfig) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` of the leaves of ``params`` that ``config.trainable`` selects.

    Raises:
        TargetError: as :func:`check_trainable_paths`, or a selected leaf is not floating point.
        NotAnArrayError: a selected leaf is not an array.
    """
    if not config.trainable:
        return []
    leaves = leaves_with_paths(params)
    selected = set(check_trainable_paths([p for p, _ in leaves], config))
    out = []
    for path, leaf in leaves:
        if path not in selected:
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape") or isinstance(leaf, (str, bytes)):
            raise NotAnArrayError(
                f"{path}: trainable selects a leaf of type {type(leaf).__name__}, not an array; "
                "expected a weight. Narrow LoraConfig.trainable"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TargetError(
                f"{path}: trainable selects a leaf of dtype {dtype}, which cannot take gradients; "
                "expected a floating-point weight. Narrow LoraConfig.trainable"
            )
        out.append((path, leaf))
    return out


def copy_extras(selected: list[tuple[str, Any]]) -> dict[str, Trainable]:
    """``{path: Trainable(copy)}``: new arrays of the base's dtype, on the base's sharding.

    Raises:
        NotAnArrayError: a leaf is abstract (``jax.ShapeDtypeStruct``): its values cannot be copied.
    """
    out = {}
    for path, leaf in selected:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise NotAnArrayError(
                f"{path}: trainable selects this leaf, but params holds a jax.ShapeDtypeStruct here; "
                "a trainable extra starts as a copy of the base's values. Pass concrete params (or "
                "call jax.eval_shape(jlora.init, key, params, config) for shapes only)"
            )
        out[path] = Trainable(jnp.array(leaf, copy=True))
    return out


def check_extra_fit(path: str, weight: Any, extra: Trainable) -> None:
    """Raises :class:`AdapterMismatchError` unless ``extra`` has ``weight``'s shape and dtype."""
    value = extra.value
    found = (tuple(getattr(value, "shape", ())), getattr(value, "dtype", None))
    expected = (tuple(weight.shape), weight.dtype)
    if not hasattr(value, "shape") or found != expected:
        raise AdapterMismatchError(
            f"{path}: the trainable extra has shape {found[0]} {found[1]} but the base leaf has "
            f"shape {expected[0]} {expected[1]}; an extra replaces its base leaf, so both must "
            "agree exactly. Were these adapters made for another model? Create them with "
            "jlora.init on this model's params (cast a float32-trained extra back to the base's "
            "dtype before merging)"
        )
