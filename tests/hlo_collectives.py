"""The collectives in a compiled XLA program's HLO text: what a jitted step sends between devices.

``collectives(jax.jit(f).lower(*args).compile().as_text())`` lists every all-gather, all-reduce,
reduce-scatter, all-to-all and collective-permute with the shapes of its results and operands.
Counts are static: a collective inside a ``while`` body (``nn.scan``, ``lax.scan``) appears once
but runs once per iteration; ``Collective.computation`` says where it sits.

Async pairs (``all-gather-start`` / ``all-gather-done``, as on GPU and TPU) count once, at the
``-done``, whose result is the collective's result. Tuple-shaped collectives (XLA's combiners merge
several all-reduces into one) keep one entry with several results; :func:`arrays` flattens them,
so two programs can be compared regardless of how XLA combined their collectives.

This lives with the tests, not in jlora: HLO text is XLA's debug format, which changes between
releases (replica-group syntax, async forms), so it makes a poor public API.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_BYTES |= {"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$"
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[sufc]\d+|bf16|f8\w*)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array's dtype and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def bytes(self) -> int:
        size = 1 if self.dtype.startswith("f8") else _BYTES[self.dtype]
        return size * math.prod(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: its kind, results, operands and enclosing computation."""

    kind: str
    name: str
    results: tuple[Array, ...]
    operands: tuple[Array, ...]
    computation: str

    @property
    def bytes(self) -> int:
        """Bytes of the results (for all-reduce, also of the operands)."""
        return sum(a.bytes for a in self.results)


def parse_arrays(shape: str) -> tuple[Array, ...]:
    """The arrays of an HLO shape string: ``f32[3,9]{1,0}`` or a tuple ``(f32[2], s32[])``."""
    return tuple(
        Array(m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
        for m in _ARRAY.finditer(shape)
    )


def _operand_names(rest: str) -> list[str]:
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in an HLO module's text, in order of appearance."""
    shapes: dict[str, tuple[Array, ...]] = {}
    operands: dict[str, list[str]] = {}
    found = []
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            computation = header["name"]
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, op, results = m["name"], m["op"], parse_arrays(m["shape"])
        shapes[name], operands[name] = results, _operand_names(m["rest"])
        kind = op.removesuffix("-done")
        if kind in KINDS:
            if op.endswith("-done"):  # the -start's operands are the collective's
                operands[name] = [o for s in operands[name] for o in operands.get(s, [])]
            found.append((kind, name, results, computation))
    return [
        Collective(
            kind, name, results, tuple(a for o in operands[name] for a in shapes.get(o, ())), where
        )
        for kind, name, results, where in found
    ]


def arrays(found: list[Collective]) -> collections.Counter:
    """``Counter({(kind, Array): count})``: each result array of each collective, tuples flattened."""
    return collections.Counter((c.kind, a) for c in found for a in c.results)


def table(found: list[Collective]) -> dict[str, tuple[int, int, int]]:
    """``{kind: (instructions, result arrays, result bytes)}`` for the kinds present."""
    out = {}
    for kind in KINDS:
        of_kind = [c for c in found if c.kind == kind]
        if of_kind:
            out[kind] = (
                len(of_kind),
                sum(len(c.results) for c in of_kind),
                sum(c.bytes for c in of_kind),
            )
    return out


def weight_shapes(
    weights: Iterable[tuple[str, tuple[int, ...], Any]], *, stacked: str = "layers/"
) -> set[tuple[int, ...]]:
    """The shapes a collective moving a weight would have.

    For each ``(path, shape, sharding)``: the global shape and one device's shard, and for a
    stacked weight (``path`` under ``stacked``, scanned over its first axis) one layer of each.
    """
    shapes = set()
    for path, shape, sharding in weights:
        shard = sharding.shard_shape(shape)
        shapes |= {tuple(shape), tuple(shard)}
        if path.startswith(stacked):
            shapes |= {tuple(shape[1:]), tuple(shard[1:])}
    return shapes


def weight_sized(found: list[Collective], shapes: set[tuple[int, ...]]) -> collections.Counter:
    """``Counter({(kind, shape): count})`` of the results and operands with a shape in ``shapes``."""
    return collections.Counter(
        (c.kind, a.shape) for c in found for a in c.results + c.operands if a.shape in shapes
    )
