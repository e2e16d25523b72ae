"""Sharding in types: the output shardings jlora's products name under explicit mesh axes.

Under a mesh with explicit axes (``jax.make_mesh(..., axis_types=(AxisType.Explicit,) * n)``
activated with ``jax.set_mesh``) every array's type carries its sharding, and jax refuses a
product whose output sharding it cannot infer: contracting axes sharded on both sides ("it is
ambiguous how the output should be sharded"), or one mesh axis on two output axes. A row-parallel
weight's ``x a`` is the first case (both sides split over the model axis), an FSDP weight's
``(x a) b`` can be the second (rows and fan-out both split over the data axis).

So every product in :mod:`jlora.ops`, ``merge`` and the Linen terms passes ``out_sharding``: the
lhs's batch and free axes keep their entries, the rhs's free axes keep theirs unless a mesh axis is
already used (then that axis is replicated). For ``x a`` that is ``(rows, None)``: a rank-sized
all-reduce of partial sums, the collective ``x W0`` needs. Off explicit mode (no mesh, or
``AxisType.Auto``) the shardings are None and every call is the plain one, so nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

Entries = tuple[Any, ...]
DotDims = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def _type_sharding(x: Any) -> Any:
    typeof = getattr(jax, "typeof", None)  # sharding in types: jax >= 0.6, guarded all the same
    if typeof is None or not hasattr(x, "shape"):
        return None
    return getattr(typeof(x), "sharding", None)


def entries(x: Any) -> Entries | None:
    """One PartitionSpec entry per axis of ``x`` when its type names explicit mesh axes, else None."""
    sharding = _type_sharding(x)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not getattr(mesh, "explicit_axes", ()):
        return None
    spec = tuple(sharding.spec)
    return (*spec, *(None,) * (np.ndim(x) - len(spec)))


def _mesh_axes(entry: Any) -> set[str]:
    if entry is None:
        return set()
    return set(entry) if isinstance(entry, tuple) else {entry}


def sharding(like: Any, spec: Sequence[Any]) -> NamedSharding:
    """``spec`` on the (abstract) mesh of ``like``'s type."""
    return NamedSharding(_type_sharding(like).mesh, PartitionSpec(*spec))


def dot_sharding(lhs: Any, rhs: Any, dims: DotDims) -> NamedSharding | None:
    """The ``out_sharding`` for ``lax.dot_general(lhs, rhs, dims)``; None off explicit mode.

    The output's axes are ``(batch, lhs free, rhs free)``, as ``dot_general`` orders them.
    """
    left, right = entries(lhs), entries(rhs)
    if left is None and right is None:
        return None
    like = lhs if left is not None else rhs
    left = left or (None,) * np.ndim(lhs)
    right = right or (None,) * np.ndim(rhs)
    (l_contract, r_contract), (l_batch, r_batch) = dims
    batch = [left[i] for i in l_batch]
    l_free = [e for i, e in enumerate(left) if i not in l_contract and i not in l_batch]
    r_free = [e for i, e in enumerate(right) if i not in r_contract and i not in r_batch]
    used = set().union(*map(_mesh_axes, batch + l_free))
    r_free = [None if _mesh_axes(e) & used else e for e in r_free]
    return sharding(like, (*batch, *l_free, *r_free))


def rows_sharding(x: Any, *others: Any) -> NamedSharding | None:
    """``x``'s first axis split as it is, every other axis whole; None off explicit mode.

    For a convolution's output: rows keep their split, spatial and rank axes are whole.
    """
    found = [(y, e) for y in (x, *others) if (e := entries(y)) is not None]
    if not found:
        return None
    first = entries(x)
    return sharding(found[0][0], (first[0] if first else None,))


def matmul_dims(lhs_ndim: int, rhs_ndim: int = 2) -> DotDims:
    """``dot_general`` dims of ``lhs @ rhs`` for a 2-D ``rhs``: the last axis against the first."""
    return (((lhs_ndim - 1,), (rhs_ndim - 2,)), ((), ()))


def like(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x`` resharded to ``y``'s explicit sharding when the two differ (a no-op otherwise)."""
    want = entries(y)
    if want is None or entries(x) == want:
        return x
    return jax.sharding.reshard(x, sharding(y, want))
