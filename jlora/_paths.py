"""Parameter paths: the ``/``-joined keys of a pytree, and nesting flat ``{path: leaf}`` dicts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax

PathLeaf = tuple[str, Any]


def key_to_str(key: Any) -> str:
    """One path entry as a string: dict keys, attribute names and sequence indices."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_to_str(path: Iterable[Any]) -> str:
    """A key path as ``a/b/c``."""
    return "/".join(key_to_str(k) for k in path)


def is_box(x: Any) -> bool:
    """Whether ``x`` is a Flax metadata box (``nn.Partitioned``, ``nn.LogicallyPartitioned``, any
    ``flax.core.meta.AxisMetadata``): a leaf wrapped with its sharding annotation. Duck-typed, so
    the functional core needs no Flax."""
    return (
        not isinstance(x, type)
        and callable(getattr(x, "unbox", None))
        and callable(getattr(x, "replace_boxed", None))
    )


def unbox(x: Any) -> Any:
    """The value inside a metadata box (no sharding constraint applied), else ``x`` itself."""
    if not is_box(x):
        return x
    return x.value if hasattr(x, "value") else x.unbox(apply_constraint=False)


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[PathLeaf]:
    """``[(path, leaf), ...]`` in tree order.

    A metadata box counts as the leaf it wraps: its path is the weight's (``dense/kernel``, not
    ``dense/kernel/value``) and the value is unboxed, so targets, layouts and fingerprints see
    boxed and plain trees alike. (A box ``is_leaf`` accepts is returned as it is.)
    """

    def stop(x: Any) -> bool:
        return is_box(x) or (is_leaf is not None and is_leaf(x))

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)
    return [
        (path_to_str(p), leaf if is_leaf is not None and is_leaf(leaf) else unbox(leaf))
        for p, leaf in flat
    ]


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` to ``{"a": {"b": x}}``."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out
