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


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[PathLeaf]:
    """``[(path, leaf), ...]`` in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_to_str(p), leaf) for p, leaf in flat]


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
