"""Making adapter banks: empty, from adapter trees, from checkpoints and PEFT directories.

:class:`BankMaking` holds :class:`jlora.serving.AdapterBank`'s constructors, so ``_bank.py`` keeps
the slot operations. Every constructor starts from :meth:`~BankMaking.empty` and fills slots with
:meth:`AdapterBank.put`, so every bank's arrays come out of the same jitted writer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from .._errors import BankError
from .._paths import unbox
from ._slots import adapter_table, template_layouts, zero_table

if TYPE_CHECKING:
    from ._bank import AdapterBank


class BankMaking:
    """The constructors of :class:`jlora.serving.AdapterBank` (a base class of it)."""

    @classmethod
    def empty(
        cls,
        params: Any,
        template: Any | Sequence[Any],
        *,
        capacity: int,
        max_rank: int,
        dtype: Any = "float32",
    ) -> AdapterBank:
        """A bank with no adapters, for the paths and layouts of ``template``.

        Args:
            params: the base (arrays or ``jax.ShapeDtypeStruct``): only shapes are read.
            template: an adapter tree, or a sequence of them, whose paths (their union) the bank
                serves; abstract trees (``jax.eval_shape(jlora.init, ...)``) work.
            capacity: the number of slots ``N``.
            max_rank: the rank ``R`` of every slot.
            dtype: the factors' dtype, a floating-point one.

        Raises:
            BankError: ``capacity`` or ``max_rank`` below 1, a ``dtype`` that is not floating.
            AdapterMismatchError: a template path is not a weight of ``params``, does not fit
                it, or two templates give one path different layouts.

        Example:
            >>> import jax, jax.numpy as jnp, jlora
            >>> from jlora.serving import AdapterBank
            >>> params = {"w": jnp.ones((6, 4))}
            >>> config = jlora.LoraConfig(targets="w", rank=2)
            >>> shapes = jax.eval_shape(jlora.init, jax.random.key(0), params, config)
            >>> bank = AdapterBank.empty(params, shapes, capacity=8, max_rank=4, dtype="bfloat16")
            >>> bank.names.count(None), bank.factors["w"].a.dtype
            (8, dtype(bfloat16))
            >>> one = jlora.init(jax.random.key(1), params, config)  # float32 factors
            >>> bank.put(0, one, cast=True).names[0]  # cast: rounded to bfloat16 on purpose
            'slot0'
        """
        for what, value in (("capacity", capacity), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise BankError(f"AdapterBank: {what} {value!r} is invalid; expected an int >= 1")
        try:
            floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise BankError(
                f"AdapterBank: dtype {dtype!r} is invalid; expected a floating-point dtype such "
                "as 'float32' or 'bfloat16'"
            )
        leaves, layouts = template_layouts(params, template)
        spec, weights = [], {}
        for path in (p for p in leaves if p in layouts):
            leaf = unbox(leaves[path])
            shape, layout = tuple(leaf.shape), layouts[path]
            a_shape, b_shape = layout.factor_shapes(shape, int(max_rank))
            n = int(capacity)
            spec.append((path, (n, *a_shape), (n, *b_shape), jnp.dtype(dtype).name, layout))
            weights[path] = (shape, jnp.dtype(leaf.dtype).name)
        empty = cls(zero_table(tuple(spec)), weights, *((None,) * capacity,) * 3)
        return empty.remove(0)  # every bank's arrays come out of the same jitted writer

    @classmethod
    def build(
        cls,
        params: Any,
        adapters: Mapping[str, Any],
        *,
        capacity: int | None = None,
        max_rank: int | None = None,
        dtype: Any = "float32",
        cast: bool = False,
    ) -> AdapterBank:
        """A bank holding ``adapters`` in slots ``0, 1, ...`` (in the mapping's order).

        Args:
            params: the base the adapters were made for (only shapes are read).
            adapters: ``{name: adapter tree}`` or ``{name: (adapter tree, LoraConfig)}`` (the
                config's scales are then checked against the factors').
            capacity: the number of slots; defaults to ``len(adapters)``. Leave room for adapters
                you will :meth:`put` later: capacity never grows.
            max_rank: the rank of every slot; defaults to the largest rank given.
            dtype: the factors' dtype.
            cast: round factors wider than ``dtype`` to it (see :meth:`put`).

        Returns:
            The bank; paths adapted by some adapters only are zero for the others.

        Raises:
            BankError: no adapters, more adapters than ``capacity``, a rank above ``max_rank``,
                factors wider than ``dtype`` without ``cast``.
            AdapterMismatchError: adapters that do not fit ``params`` or each other's layouts.
        """
        if not adapters:
            raise BankError(
                "AdapterBank.build: no adapters given; use AdapterBank.empty(params, template, "
                "capacity=..., max_rank=...) for a bank to fill later"
            )
        pairs = {k: v if isinstance(v, tuple) else (v, None) for k, v in adapters.items()}
        trees = [tree for tree, _ in pairs.values()]
        if max_rank is None:
            max_rank = max(f.rank for t in trees for f in adapter_table(t, "an adapter").values())
        capacity = len(pairs) if capacity is None else capacity
        bank = cls.empty(params, trees, capacity=capacity, max_rank=max_rank, dtype=dtype)
        if len(pairs) > bank.capacity:
            raise BankError(
                f"AdapterBank.build: {len(pairs)} adapters ({list(pairs)}) do not fit "
                f"capacity={capacity}; pass a larger capacity"
            )
        for slot, (name, (tree, config)) in enumerate(pairs.items()):
            bank = bank.put(slot, tree, config, name=name, cast=cast)
        return bank

    @classmethod
    def from_checkpoints(
        cls, params: Any, directories: Mapping[str, Any], **kwargs: Any
    ) -> AdapterBank:
        """A bank of jlora adapter checkpoints, ``{name: directory}``; see :mod:`._bank_load`."""
        from ._bank_load import from_checkpoints

        return from_checkpoints(cls, params, directories, **kwargs)

    @classmethod
    def from_peft(cls, params: Any, directory: Any, **kwargs: Any) -> AdapterBank:
        """A bank of PEFT's multi-adapter directory layout; see :mod:`._bank_load`."""
        from ._bank_load import from_peft

        return from_peft(cls, params, directory, **kwargs)
