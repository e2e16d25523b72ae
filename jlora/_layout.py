"""Which axes of a weight are stack, fan-in and fan-out, and the shapes of its factors.

A targeted weight ``W0`` whose axes are, in some order, ``stack``, ``fan_in`` and ``fan_out`` axes
gets factors

    a: (*stack, *fan_in, rank)      b: (*stack, rank, *fan_out)

(each group in the weight's own order), so that ``delta = scale * a @ b`` (contracting ``rank``),
with its axes put back in the weight's order, has the weight's shape. ``stack`` axes get an
independent adapter per index: the leading axes of scanned or stacked layers, and axes an einsum
shares between its input, kernel and output (one adapter per head or per expert).

A layout is written as a string with one letter per weight axis, in the weight's order:

* ``s``: a stack axis;
* ``i``: a fan-in axis (contracted with the layer input);
* ``o``: a fan-out axis (appears in the layer output);
* ``v``: the row axis of an embedding table (a lookup; its factors initialise the other way round).

Examples: ``"io"`` a Dense kernel, ``"oi"`` a kernel stored transposed ``(out, in)`` (Hugging Face
GPT-2's ``Conv1D`` in Flax), ``"ioo"`` a DenseGeneral query kernel ``(d_model, heads, head_dim)``,
``"iio"`` its output kernel or a 1-D conv kernel ``(width, c_in, c_out)``, ``"iiio"`` a 2-D conv
kernel, ``"oio"`` Gemma's query einsum ``'BTD,NDH->BTNH'`` (kernel ``(heads, d_model, head_dim)``),
``"ooio"`` its stacked key/value kernel ``'BTD,CKDH->CBTKH'``, ``"sio"`` Dense kernels stacked by
``nn.scan`` or a per-head kernel, ``"vo"`` an embedding table.

Leading ``s`` letters may be left out: a weight with more axes than its layout string has letters
is read with extra leading stack axes, so a layer's layout stays true for its slices inside a scan.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any

_SPEC = re.compile(r"s*(i+|v)o+")  # the canonical order: stack, fan-in, fan-out
_ROLES = re.compile(r"[sio]+")


def _canonical(fan_in_ndim: int, fan_out_ndim: int, embedding: bool) -> str:
    return ("v" if embedding else "i" * fan_in_ndim) + "o" * fan_out_ndim


@dataclasses.dataclass(frozen=True, repr=False)
class Layout:
    """The stack/fan-in/fan-out structure of a targeted weight.

    Only what stays true for a layer's slices is stored: the fan-in and fan-out axis counts and,
    when the weight's axes are not in the canonical order (stack, fan-in, fan-out), the roles of
    the layer's own axes in ``order``. Extra leading axes are stack axes, so a scan that slices
    stack axes off the weight and the factors leaves this metadata true for the slices.

    Attributes:
        fan_in_ndim: number of fan-in axes (1 for an embedding table's row axis).
        fan_out_ndim: number of fan-out axes.
        embedding: whether the weight is an embedding table (looked up, not multiplied).
        order: the roles (``s``, ``i``, ``o``) of the weight's trailing axes, in the weight's
            order, when they are not canonical (``"oi"``, ``"oio"``, ``"iso"``); ``""`` otherwise.
    """

    fan_in_ndim: int
    fan_out_ndim: int
    embedding: bool = False
    order: str = ""

    def __post_init__(self) -> None:
        for name in ("fan_in_ndim", "fan_out_ndim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(
                    f"Layout.{name}: {value!r} is invalid; expected an integer >= 1 (a weight has "
                    "at least one fan-in and one fan-out axis), e.g. Layout(1, 1) for a "
                    "(fan_in, fan_out) kernel, or Layout.parse('sio')"
                )
            object.__setattr__(self, name, int(value))
        if not isinstance(self.order, str):
            raise ValueError(
                f"Layout.order: {self.order!r} is invalid; expected a string of axis roles such "
                "as 'oio' (or '' for the canonical order)"
            )
        order = self.order.lstrip("s")
        if order == _canonical(self.fan_in_ndim, self.fan_out_ndim, False):
            order = ""
        if order and (
            self.embedding
            or not _ROLES.fullmatch(order)
            or (order.count("i"), order.count("o")) != (self.fan_in_ndim, self.fan_out_ndim)
        ):
            raise ValueError(
                f"Layout order {self.order!r} does not fit fan_in_ndim={self.fan_in_ndim}, "
                f"fan_out_ndim={self.fan_out_ndim}, embedding={self.embedding}; build layouts "
                "with Layout.parse('oio')"
            )
        object.__setattr__(self, "order", order)

    def __repr__(self) -> str:
        fields = f"fan_in_ndim={self.fan_in_ndim}, fan_out_ndim={self.fan_out_ndim}, "
        fields += f"embedding={self.embedding}"
        return f"Layout({fields}{f', order={self.order!r}' if self.order else ''})"

    @classmethod
    def parse(cls, spec: str) -> Layout:
        """Reads a layout string such as ``"sio"`` or ``"oio"`` (see the module docstring).

        Example:
            >>> Layout.parse("siio")
            Layout(fan_in_ndim=2, fan_out_ndim=1, embedding=False)
            >>> Layout.parse("oio")
            Layout(fan_in_ndim=1, fan_out_ndim=2, embedding=False, order='oio')
        """
        if isinstance(spec, str) and _SPEC.fullmatch(spec):
            return cls(
                fan_in_ndim=max(spec.count("i"), spec.count("v")),
                fan_out_ndim=spec.count("o"),
                embedding="v" in spec,
            )
        if isinstance(spec, str) and _ROLES.fullmatch(spec) and "i" in spec and "o" in spec:
            return cls(spec.count("i"), spec.count("o"), order=spec)
        raise ValueError(
            f"layout {spec!r} is not a layout string; expected one letter per weight axis, in the "
            "weight's order: 's' stack, 'i' fan-in, 'o' fan-out (at least one of each of i and "
            "o), or 'vo' for an embedding table, e.g. 'io', 'sio', 'oi', 'ioo', 'oio', 'iiio'"
        )

    @property
    def own_ndim(self) -> int:
        """Number of axes the layout string names (the layer's own axes)."""
        return len(self.order) if self.order else self.fan_in_ndim + self.fan_out_ndim

    def roles(self, ndim: int) -> str:
        """The role letter of each of the ``ndim`` axes of a weight (``'s'``, ``'i'``/``'v'``, ``'o'``)."""
        own = self.order or _canonical(self.fan_in_ndim, self.fan_out_ndim, self.embedding)
        return "s" * (ndim - len(own)) + own

    def spec(self, ndim: int) -> str:
        """The layout string for a weight with ``ndim`` axes."""
        return self.roles(ndim)

    def fits(self, ndim: int) -> bool:
        """Whether a weight with ``ndim`` axes can have this layout."""
        return ndim >= self.own_ndim

    def stack_ndim(self, weight_shape: tuple[int, ...]) -> int:
        """Number of stack axes of a weight of this layout (leading and shared)."""
        return len(weight_shape) - self.fan_in_ndim - self.fan_out_ndim

    def to_factor_order(self, ndim: int) -> tuple[int, ...]:
        """The permutation that puts a weight's axes in factor order (stack, fan-in, fan-out).

        ``weight.transpose(perm)`` has shape ``(*stack, *fan_in, *fan_out)``.

        Example:
            >>> Layout.parse("oio").to_factor_order(3)
            (1, 0, 2)
        """
        roles = self.roles(ndim)
        return tuple(i for group in ("s", "iv", "o") for i, c in enumerate(roles) if c in group)

    def from_factor_order(self, ndim: int) -> tuple[int, ...]:
        """The inverse of :meth:`to_factor_order`: puts a delta back in the weight's order."""
        perm = self.to_factor_order(ndim)
        return tuple(perm.index(i) for i in range(ndim))

    def split(self, weight_shape: tuple[Any, ...]) -> tuple[tuple[Any, ...], ...]:
        """Splits a weight shape (or any per-axis tuple) into ``(stack, fan_in, fan_out)`` parts."""
        roles = self.roles(len(weight_shape))
        return tuple(
            tuple(x for x, c in zip(weight_shape, roles, strict=True) if c in group)
            for group in ("s", "iv", "o")
        )

    def factor_shapes(
        self, weight_shape: tuple[int, ...], rank: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``a`` and ``b`` for a weight of this layout.

        Example:
            >>> Layout.parse("ioo").factor_shapes((64, 4, 16), rank=8)
            ((64, 8), (8, 4, 16))
            >>> Layout.parse("oio").factor_shapes((4, 64, 16), rank=8)
            ((64, 8), (8, 4, 16))
        """
        stack, fan_in, fan_out = self.split(weight_shape)
        return (*stack, *fan_in, rank), (*stack, rank, *fan_out)

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        """The largest useful rank: ``min(prod(fan_in), prod(fan_out))``."""
        _, fan_in, fan_out = self.split(weight_shape)
        return min(math.prod(fan_in), math.prod(fan_out))
