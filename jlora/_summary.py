"""`summary`: a printable table of what was adapted, one row per weight (PEFT's
``print_trainable_parameters``, per weight)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax

from . import _checks
from ._extras import Trainable
from ._factors import LoraFactors
from ._merge import adapter_tables
from ._paths import leaves_with_paths


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One adapted weight (or trainable extra).

    Attributes:
        path: the weight's parameter path.
        kind: the layer kind (``nn.Dense``, ``nnx.Einsum``) where known, else the layout string;
            ``"trainable"`` for an extra trained in full.
        shape: the weight's shape.
        rank: the adapter's rank (0 for an extra).
        scale: the adapter's scale (``alpha / r``; 1 for an extra).
        params: trainable parameters (``a`` and ``b`` and a DoRA magnitude, or the extra's
            size).
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    scale: float
    params: int


@dataclasses.dataclass(frozen=True)
class AdapterSummary:
    """What an adapter tree trains; ``str()`` prints it as a table.

    Attributes:
        rows: one per adapted weight and per trainable extra, in tree order.
        base_params: the base's parameter count, when the params were given.
    """

    rows: tuple[SummaryRow, ...]
    base_params: int | None = None

    @property
    def trainable_params(self) -> int:
        """Parameters the adapters train."""
        return sum(r.params for r in self.rows)

    def __str__(self) -> str:
        header = ("path", "kind", "weight shape", "rank", "scale", "params")
        cells = [
            (r.path, r.kind, str(r.shape), str(r.rank or "-"), f"{r.scale:g}", f"{r.params:,}")
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in (header, *cells)) for i in range(len(header))]
        right = (False, False, False, True, True, True)

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(
                c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
            ).rstrip()

        lines = [line(header), *(line(c) for c in cells)]
        total = f"trainable params: {self.trainable_params:,}"
        if self.base_params:
            share = 100 * self.trainable_params / self.base_params
            total += f" of {self.base_params:,} in the base ({share:.2f}%)"
        return "\n".join([*lines, total])


def _weight_shape(f: LoraFactors) -> tuple[int, ...]:
    n_stack = f.a.ndim - 1 - f.layout.fan_in_ndim
    parts = {
        "s": iter(f.a.shape[:n_stack]),
        "i": iter(f.a.shape[n_stack:-1]),
        "o": iter(f.b.shape[n_stack + 1 :]),
    }
    ndim = f.a.ndim - 1 + f.layout.fan_out_ndim
    return tuple(next(parts["i" if c == "v" else c]) for c in f.layout.roles(ndim))


def summary(
    adapters: Any,
    params: Any = None,
    *,
    kinds: Mapping[str, str] | None = None,
    magnitudes: Any | None = None,
) -> AdapterSummary:
    """A table of the adapted weights: path, kind, weight shape, rank, scale and parameters.

    Args:
        adapters: an adapter tree (:func:`jlora.init`, training, a checkpoint).
        params: the base params, to report the trainable share of the whole model.
        kinds: ``{weight path: layer kind}`` to show (the Flax transforms' ``summary`` fill it);
            without it the layout string is shown.
        magnitudes: DoRA's magnitudes ``{path: m}`` for these adapters; each counts in its
            weight's row (``jlora.nnx.summary`` passes a DoRA model's own).

    Returns:
        An :class:`AdapterSummary`; ``print`` it.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"dense": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="dense", rank=2))
        >>> print(jlora.summary(adapters, params))
        path          kind  weight shape  rank  scale  params
        dense/kernel  io    (6, 4)           2      8      20
        trainable params: 20 of 28 in the base (71.43%)
    """
    _checks.adapters_given(adapters)
    if kinds is not None and not isinstance(kinds, Mapping):
        raise TypeError(
            f"kinds: got {_checks.found(kinds)}; expected None or a mapping from adapter path to "
            "kind name, e.g. {'decoder/mlp/kernel': 'mlp'}"
        )
    factors, extras = adapter_tables(adapters)
    from .checkpoint._magnitudes import check  # the package imports this module

    dora = {p: int(math.prod(m.shape)) for p, m in check(magnitudes, factors).items()}
    kinds = dict(kinds or {})
    rows = {}
    for path, f in factors.items():
        shape = _weight_shape(f)
        kind = kinds.get(path, f.layout.spec(len(shape)))
        size = int(f.a.size + f.b.size) + dora.get(path, 0)
        rows[path] = SummaryRow(path, kind, shape, f.rank, f.scale, size)
    for path, e in extras.items():
        rows[path] = SummaryRow(path, "trainable", tuple(e.value.shape), 0, 1.0, int(e.value.size))
    order = [p for p in _paths(adapters) if p in rows]
    base = None
    if params is not None:
        base = sum(math.prod(getattr(x, "shape", ())) for x in jax.tree.leaves(params))
    return AdapterSummary(tuple(rows[p] for p in order), base)


def _paths(adapters: Any) -> list[str]:
    nodes = leaves_with_paths(adapters, is_leaf=lambda x: isinstance(x, (LoraFactors, Trainable)))
    return [p for p, _ in nodes]
