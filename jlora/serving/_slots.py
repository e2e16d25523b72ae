"""The pieces of an adapter bank: its per-weight node, padding, and the checks on what enters it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._config import LoraConfig
from .._errors import AdapterMismatchError, BankError
from .._factors import LoraFactors
from .._layout import Layout
from .._merge import adapter_tables, check_fit
from .._paths import leaves_with_paths, unbox

BASE = -1  # the adapter id of an example that runs the base model alone


@dataclasses.dataclass(frozen=True)
class BankFactors:
    """One weight's slots: ``a: (N, *stack, *fan_in, R)``, ``b: (N, *stack, R, *fan_out)``,
    ``scale: (N,)`` (leaves) and the weight's static ``layout``."""

    a: jax.Array
    b: jax.Array
    scale: jax.Array
    layout: Layout = dataclasses.field(metadata={"static": True})


jax.tree_util.register_dataclass(
    BankFactors, data_fields=["a", "b", "scale"], meta_fields=["layout"]
)


@jax.jit
def write_slot(table: dict, slot: jax.Array, new: dict) -> dict:
    # One compiled program per bank structure: the slot is traced, so every put reuses it.
    def one(x, update):
        return jax.lax.dynamic_update_index_in_dim(x, update.astype(x.dtype), slot, 0)

    return jax.tree.map(one, table, new)


@functools.partial(jax.jit, static_argnums=0)
def zero_table(spec: tuple) -> dict:
    """``{path: BankFactors}`` of zeros for ``spec = ((path, a_shape, b_shape, dtype, layout), ...)``,
    scales ``(capacity,)`` float32: one compiled program per bank structure, not one per shape."""
    return {
        path: BankFactors(
            jnp.zeros(a_shape, dtype),
            jnp.zeros(b_shape, dtype),
            jnp.zeros(a_shape[:1], jnp.float32),  # scales stay float32 whatever the dtype
            layout,
        )
        for path, a_shape, b_shape, dtype, layout in spec
    }


def pad(f: LoraFactors, rank: int) -> tuple[Any, Any]:
    """``f``'s factors with zero rank columns (``a``) and rows (``b``) up to ``rank``, on the host:
    NumPy pads without compiling a program per adapter shape; the bank's writer moves them."""
    a, b = unbox(f.a), unbox(f.b)
    extra = rank - a.shape[-1]
    if not extra:
        return a, b
    n_stack = a.ndim - 1 - f.layout.fan_in_ndim
    a = np.pad(np.asarray(a), [(0, 0)] * (a.ndim - 1) + [(0, extra)])
    b = np.pad(np.asarray(b), [(0, 0)] * n_stack + [(0, extra)] + [(0, 0)] * (b.ndim - n_stack - 1))
    return a, b


def adapter_table(adapters: Any, where: str) -> dict[str, LoraFactors]:
    table, extras = adapter_tables(adapters)
    if extras:
        raise AdapterMismatchError(
            f"{next(iter(extras))}: {where} has a trainable extra (jlora.Trainable, a replaced "
            "head); a bank serves low-rank adapters only, since a replaced leaf cannot differ per "
            "example. Merge that head into the base, or serve that adapter alone"
        )
    if not table:
        raise AdapterMismatchError(f"{where} has no LoraFactors; expected an adapter tree")
    return table


def template_layouts(params: Any, template: Any) -> tuple[dict[str, Any], dict[str, Layout]]:
    """``(params leaves by path, {path: layout})`` for one adapter tree or a sequence of them."""
    templates = list(template) if isinstance(template, (list, tuple)) else [template]
    leaves = dict(leaves_with_paths(params))
    layouts: dict[str, Layout] = {}
    for i, tree in enumerate(templates):
        for path, f in adapter_table(tree, f"template {i}").items():
            if path not in leaves:
                raise AdapterMismatchError(
                    f"{path}: template {i} adapts this path but params have no such weight; "
                    "were these adapters made for another model?"
                )
            check_fit(path, unbox(leaves[path]), f)
            if layouts.setdefault(path, f.layout) != f.layout:
                raise AdapterMismatchError(
                    f"{path}: template {i} has layout {f.layout} here but an earlier one has "
                    f"{layouts[path]}; one bank needs one layout per weight"
                )
    return leaves, layouts


def _exact_in(found: jnp.dtype, dtype: jnp.dtype) -> bool:
    """Whether every ``found`` value is exactly a ``dtype`` value (mantissa and exponents fit)."""
    f, d = jnp.finfo(found), jnp.finfo(dtype)
    return f.nmant <= d.nmant and f.maxexp <= d.maxexp and f.minexp >= d.minexp


def check_dtype(path: str, f: LoraFactors, name: str, dtype: Any, cast: bool) -> None:
    """Raises unless ``f``'s factors are floating and fit ``dtype`` without rounding (or ``cast``).

    A float32 adapter in a bfloat16 bank would be rounded, so it needs ``cast=True``; a bfloat16
    adapter in a float32 bank is exact.
    """
    for which, x in (("a", f.a), ("b", f.b)):
        found = jnp.dtype(unbox(x).dtype)
        if not jnp.issubdtype(found, jnp.floating):
            raise AdapterMismatchError(
                f"{path}: adapter {name!r} has factor {which} of dtype {found.name}; expected "
                "floating-point factors"
            )
        if not cast and not _exact_in(found, jnp.dtype(dtype)):
            raise BankError(
                f"{path}: adapter {name!r} has factor {which} of dtype {found.name}, wider than "
                f"the bank's {jnp.dtype(dtype).name}, so putting it would round it; pass "
                f"cast=True to round it to {jnp.dtype(dtype).name} on purpose, or build the bank "
                f"with dtype={found.name!r}"
            )


def check_adapter(
    bank: Any, path: str, f: LoraFactors, name: str, config: LoraConfig | None, cast: bool
) -> None:
    """Raises if adapter ``name``'s factors at ``path`` cannot go into ``bank``."""
    if path not in bank.table:
        raise AdapterMismatchError(
            f"{path}: adapter {name!r} adapts this path, which the bank does not serve (it "
            f"serves {list(bank.table)}); build the bank with a template that includes it"
        )
    shape, dtype = bank.weights[path]
    check_fit(path, jax.ShapeDtypeStruct(shape, dtype), f)
    if f.layout != bank.table[path].layout:
        raise AdapterMismatchError(
            f"{path}: adapter {name!r} has layout {f.layout} but the bank's is "
            f"{bank.table[path].layout}; were these adapters made for another model?"
        )
    if f.rank > bank.max_rank:
        raise BankError(
            f"{path}: adapter {name!r} has rank {f.rank}, above the bank's max_rank "
            f"{bank.max_rank}; build the bank with max_rank >= {f.rank}"
        )
    if config is not None and f.scale != config.scale_for(path):
        raise AdapterMismatchError(
            f"{path}: adapter {name!r} has scale {f.scale} but its config gives "
            f"{config.scale_for(path)}; is this the config of these adapters?"
        )
    check_dtype(path, f, name, bank.dtype, cast)


def check_slot_ids(names: tuple[str | None, ...], ids: Any) -> None:
    """Raises :class:`BankError` for a concrete id out of ``[BASE, len(names))`` or naming an
    empty slot (``names[id] is None``)."""
    ids = np.asarray(ids)
    capacity = len(names)
    bad = np.flatnonzero((ids < BASE) | (ids >= capacity))
    if bad.size:
        raise BankError(
            f"example {int(bad[0])}: adapter id {int(ids.flat[bad[0]])} is out of range; "
            f"expected {BASE} (base only) or a slot 0 to {capacity - 1}"
        )
    for i, n in enumerate(ids.flat):
        if n != BASE and names[n] is None:
            raise BankError(
                f"example {i}: adapter id {int(n)} names an empty slot; put an adapter there "
                f"or use {BASE} for the base model"
            )


def unpad(bf: BankFactors, slot: int, rank: int, scale: Any) -> LoraFactors:
    """Slot ``slot`` of ``bf`` cut back to its true ``rank``, with its ``scale`` as given."""
    a, b = bf.a[slot], bf.b[slot]
    n_stack = a.ndim - 1 - bf.layout.fan_in_ndim
    b = jax.lax.slice_in_dim(b, 0, rank, axis=n_stack)
    return LoraFactors(a[..., :rank], b, scale, bf.layout)


def check_trained(bank: Any, factors: Any) -> dict[str, BankFactors]:
    """``factors`` as a bank table, if they fit ``bank`` (see :meth:`AdapterBank.with_factors`)."""
    found = dict(leaves_with_paths(factors, is_leaf=lambda x: isinstance(x, BankFactors)))
    if list(found) != list(bank.table):
        raise BankError(
            f"AdapterBank.with_factors: factors have paths {list(found)}; expected the bank's "
            f"{list(bank.table)} (pass a tree like bank.factors)"
        )
    for path, old in bank.table.items():
        new = found[path]
        if not isinstance(new, BankFactors) or new.layout != old.layout:
            raise BankError(f"{path}: expected BankFactors of layout {old.layout}, found {new!r}")
        for which in ("a", "b", "scale"):
            x, y = getattr(new, which), getattr(old, which)
            if (tuple(x.shape), x.dtype) != (tuple(y.shape), y.dtype):
                raise BankError(
                    f"{path}: factor {which} has shape {tuple(x.shape)} and dtype {x.dtype}; "
                    f"the bank's is {tuple(y.shape)} {y.dtype}"
                )
        if not np.array_equal(np.asarray(new.scale), np.asarray(old.scale)):
            raise BankError(
                f"{path}: the scales changed ({np.asarray(old.scale).tolist()} to "
                f"{np.asarray(new.scale).tolist()}); a scale is alpha/r, not a parameter: train "
                "with jlora.serving.freeze_scales(optimizer)"
            )
        a, b = np.asarray(new.a), np.asarray(new.b)
        n_stack = a.ndim - 2 - old.layout.fan_in_ndim
        for slot, ranks in enumerate(bank.ranks):
            rank = 0 if ranks is None else ranks.get(path, 0)
            pad_b = np.take(b[slot], np.arange(rank, b.shape[n_stack + 1]), axis=n_stack)
            if np.any(a[slot][..., rank:]) or np.any(pad_b):
                raise BankError(
                    f"{path}: slot {slot} ({bank.names[slot]!r}, rank {rank}) has nonzero values "
                    f"beyond its rank, in padded columns of a or rows of b; were they trained "
                    "with weight decay or a nonzero init? Padded entries must stay exactly zero"
                )
    return dict(found)
