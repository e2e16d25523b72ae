"""`AdapterBank`: N adapters for one base, stacked into fixed-shape arrays, one slot each.

For every adapted weight path the bank holds (a :class:`BankFactors`)

    a: (N, *stack, *fan_in, R)      b: (N, *stack, R, *fan_out)      scale: (N,)

with ``N`` the capacity (slots) and ``R`` the largest rank the bank takes, both fixed when the bank
is made. Slot ``n`` holds adapter ``n``'s factors; its term of a layer's output is
``scale[n] * (x a[n]) b[n]`` (:mod:`jlora.serving`'s ops pick ``n`` per example).

**Padding is exact.** An adapter of rank ``r < R`` fills the first ``r`` columns of ``a`` and rows
of ``b``; the rest stay zero. ``(x a) b = sum_k (x a[:, k]) b[k, :]``, and each padded term is
``(x . 0) * 0 = 0``: adding an exact zero leaves every partial sum unchanged. A path an adapter does
not adapt, and every path of an empty slot, has zero factors and scale 0.

**What can change without recompiling.** Only arrays are leaves of :attr:`AdapterBank.factors` (the
pytree that enters ``jax.jit``); the tree structure and static metadata (paths, layouts) are fixed
by the bank's construction. :meth:`AdapterBank.put` and :meth:`AdapterBank.remove` return a new bank
whose factors have the same shapes, dtypes and structure, so a jitted forward reuses its compiled
program. The scale is an array leaf for the same reason: an adapter with another alpha is new data,
not a new program. Names and true ranks per slot are host-side data of the bank, never traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._config import LoraConfig
from .._errors import BankError
from .._paths import nest
from ._bank_make import BankMaking
from ._slots import (
    BASE,
    BankFactors,
    adapter_table,
    check_adapter,
    check_slot_ids,
    check_trained,
    pad,
    unpad,
    write_slot,
)


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterBank(BankMaking):
    """N adapters of one base, padded to one rank, stacked per weight (see the module docstring).

    Build one with :meth:`build`, :meth:`empty`, :meth:`from_checkpoints` or :meth:`from_peft`;
    pass :attr:`factors` (a pytree) to jitted code and keep the bank on the host.

    Attributes:
        table: ``{path: BankFactors}``, in params order.
        weights: ``{path: (weight shape, weight dtype)}``: the base the bank was made for.
        names: each slot's adapter name, None for an empty slot.
        ranks: each slot's ``{path: true rank}``, None for an empty slot.
        scales: each slot's ``{path: scale}`` as given (the arrays hold it in float32).

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.serving import AdapterBank
        >>> params = {"w": jnp.ones((6, 4))}
        >>> one = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=2))
        >>> two = jlora.init(jax.random.key(1), params, jlora.LoraConfig(targets="w", rank=3))
        >>> bank = AdapterBank.build(params, {"one": one, "two": two}, capacity=4)
        >>> bank.factors["w"].a.shape, bank.factors["w"].scale.shape, bank.names
        ((4, 6, 3), (4,), ('one', 'two', None, None))
        >>> bank.remove(0).names
        (None, 'two', None, None)
        >>> bank
        AdapterBank(capacity=4, max_rank=3, dtype=float32, paths=1, names=('one', 'two', None, None))
    """

    table: dict[str, BankFactors]
    weights: dict[str, tuple[tuple[int, ...], str]]
    names: tuple[str | None, ...]
    ranks: tuple[dict[str, int] | None, ...]
    scales: tuple[dict[str, float] | None, ...]

    @property
    def capacity(self) -> int:
        """The number of slots ``N``."""
        return len(self.names)

    @property
    def max_rank(self) -> int:
        """The rank ``R`` every slot is padded to."""
        return next(iter(self.table.values())).a.shape[-1]

    @property
    def dtype(self) -> jnp.dtype:
        """The factors' dtype (the scales are float32 whatever it is)."""
        return next(iter(self.table.values())).a.dtype

    def __repr__(self) -> str:  # the arrays are megabytes: show what identifies the bank
        return (
            f"AdapterBank(capacity={self.capacity}, max_rank={self.max_rank}, "
            f"dtype={self.dtype.name}, paths={len(self.table)}, names={self.names})"
        )

    @property
    def factors(self) -> dict[str, Any]:
        """The arrays, nested like the params: pass this to jitted code."""
        return nest(dict(self.table))

    def _slot(self, slot: Any) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
            raise BankError(f"AdapterBank: slot {slot!r} is not an int")
        if not 0 <= slot < self.capacity:
            raise BankError(
                f"AdapterBank: slot {slot} is out of range; this bank has {self.capacity} slots "
                f"(0 to {self.capacity - 1})"
            )
        return int(slot)

    def put(
        self,
        slot: int,
        adapters: Any,
        config: LoraConfig | None = None,
        *,
        name: str | None = None,
        cast: bool = False,
    ) -> AdapterBank:
        """A new bank with ``adapters`` in ``slot`` (replacing what was there): same shapes.

        Args:
            slot: the slot, ``0 <= slot < capacity``.
            adapters: an adapter tree for this bank's base (rank at most :attr:`max_rank`).
            config: if given, each factor's scale must equal ``config.scale_for(path)``.
            name: the adapter's name (unique in the bank); defaults to ``f"slot{slot}"``.
            cast: round factors wider than the bank's :attr:`dtype` (float32 factors into a
                bfloat16 bank) to it. Without it such factors are refused: the bank never
                rounds silently. Narrower factors are always exact.

        Raises:
            BankError: ``slot`` out of range, ``name`` already in another slot, a rank above
                :attr:`max_rank`, factors wider than :attr:`dtype` without ``cast``.
            AdapterMismatchError: a path the bank does not serve, factors that do not fit the
                bank's base, another layout, a scale other than ``config``'s.
        """
        slot = self._slot(slot)
        name = f"slot{slot}" if name is None else name
        if name in self.names and self.names.index(name) != slot:
            raise BankError(
                f"AdapterBank.put: the name {name!r} is already in slot "
                f"{self.names.index(name)}; remove it first or choose another name"
            )
        table = adapter_table(adapters, f"adapter {name!r}")
        new, ranks, scales = {}, {}, {}
        for path, f in table.items():
            check_adapter(self, path, f, name, config, cast)
            a, b = pad(f, self.max_rank)
            new[path] = BankFactors(a, b, jnp.asarray(f.scale, jnp.float32), f.layout)
            ranks[path], scales[path] = f.rank, f.scale
        return self._replace(slot, new, name, ranks, scales)

    def remove(self, slot: int) -> AdapterBank:
        """A new bank with ``slot`` empty (zero factors, scale 0): same shapes."""
        return self._replace(self._slot(slot), {}, None, None, None)

    def _replace(
        self, slot: int, new: dict, name: str | None, ranks: dict | None, scales: dict | None
    ) -> AdapterBank:
        updates = {
            p: new[p]
            if p in new
            else BankFactors(  # one slot's zeros on the host, as put's padded factors: the
                np.zeros(bf.a.shape[1:], bf.a.dtype),  # writer moves them, no program per shape
                np.zeros(bf.b.shape[1:], bf.b.dtype),
                np.zeros((), bf.scale.dtype),
                bf.layout,
            )
            for p, bf in self.table.items()
        }
        table = write_slot(self.table, jnp.asarray(slot, jnp.int32), updates)

        def at_slot(old: tuple, value: Any) -> tuple:
            return (*old[:slot], value, *old[slot + 1 :])

        return dataclasses.replace(
            self,
            table=table,
            names=at_slot(self.names, name),
            ranks=at_slot(self.ranks, ranks),
            scales=at_slot(self.scales, scales),
        )

    def with_factors(self, factors: Any) -> AdapterBank:
        """This bank holding ``factors`` (e.g. trained ones), same names, ranks and scales.

        Args:
            factors: a tree like :attr:`factors`, of the same shapes and dtypes.

        Raises:
            BankError: another structure, shape or dtype; a scale that changed (freeze it with
                :func:`jlora.serving.freeze_scales`); a nonzero value beyond a slot's true rank
                (padded rank columns of ``a`` and rows of ``b`` must stay exactly zero, or the
                slot no longer holds an adapter of its rank).

        Example:
            >>> import jax, jax.numpy as jnp, jlora
            >>> params = {"w": jnp.ones((6, 4))}
            >>> one = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=2))
            >>> bank = AdapterBank.build(params, {"one": one}, capacity=2)
            >>> trained = jax.tree.map(lambda x: x, bank.factors)
            >>> bank.with_factors(trained).names
            ('one', None)
        """
        table = check_trained(self, factors)
        return dataclasses.replace(self, table=table)

    def slot_of(self, name: str) -> int:
        """The slot holding the adapter called ``name``."""
        if name not in self.names:
            held = [n for n in self.names if n is not None]
            raise BankError(f"AdapterBank: no adapter named {name!r}; the bank holds {held}")
        return self.names.index(name)

    def ids(self, names: Sequence[str | None]) -> jax.Array:
        """Per-example adapter ids for ``names`` (None: :data:`BASE`), as an int32 array.

        Example:
            >>> import jax, jax.numpy as jnp, jlora
            >>> params = {"w": jnp.ones((6, 4))}
            >>> one = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=2))
            >>> AdapterBank.build(params, {"one": one}).ids(["one", None]).tolist()
            [0, -1]
        """
        return jnp.asarray([BASE if n is None else self.slot_of(n) for n in names], jnp.int32)

    def check_ids(self, ids: Any) -> None:
        """Raises :class:`jlora.serving.BankError` if a concrete id is out of range or names an
        empty slot (jitted code cannot raise: there such ids give NaN outputs instead)."""
        check_slot_ids(self.names, ids)

    def adapter(self, slot: int) -> dict[str, Any]:
        """The adapter tree in ``slot``, unpadded to its true ranks, with its scales as given."""
        slot = self._slot(slot)
        if self.ranks[slot] is None:
            raise BankError(f"AdapterBank.adapter: slot {slot} is empty")
        return nest(
            {
                path: unpad(self.table[path], slot, r, self.scales[slot][path])
                for path, r in self.ranks[slot].items()
            }
        )
