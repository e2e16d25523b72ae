"""Which axes of a weight are stack, fan-in and fan-out, and the shapes of its factors.

A targeted weight ``W0`` of shape ``(*stack, *fan_in, *fan_out)`` gets factors

    a: (*stack, *fan_in, rank)      b: (*stack, rank, *fan_out)

so that ``delta = scale * a @ b`` (contracting ``rank``) has the weight's shape. ``stack`` axes are the
leading axes of scanned or stacked layers, each slice of which gets an independent adapter.

A layout is written as a string with one letter per weight axis, in order:

* ``s``: a stack axis (``nn.scan`` layers, experts);
* ``i``: a fan-in axis (contracted with the layer input);
* ``o``: a fan-out axis (appears in the layer output);
* ``v``: the row axis of an embedding table (a lookup; its factors initialise the other way round).

Examples: ``"io"`` a Dense kernel, ``"ioo"`` a DenseGeneral query kernel ``(d_model, heads, head_dim)``,
``"iio"`` its output kernel or a 1-D conv kernel ``(width, c_in, c_out)``, ``"iiio"`` a 2-D conv kernel,
``"sio"`` Dense kernels stacked by ``nn.scan``, ``"vo"`` an embedding table.
"""

from __future__ import annotations

import dataclasses
import math
import re

_SPEC = re.compile(r"s*(i+|v)o+")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The fan-in/fan-out structure of a targeted weight (stack axes are whatever leads).

    Only the fan-in and fan-out axis counts are stored: a scan that slices the stack axes off the
    factors leaves this metadata true for the slices.

    Attributes:
        fan_in_ndim: number of fan-in axes (1 for an embedding table's row axis).
        fan_out_ndim: number of fan-out axes.
        embedding: whether the weight is an embedding table (looked up, not multiplied).
    """

    fan_in_ndim: int
    fan_out_ndim: int
    embedding: bool = False

    @classmethod
    def parse(cls, spec: str) -> Layout:
        """Reads a layout string such as ``"sio"`` (see the module docstring).

        Example:
            >>> Layout.parse("siio")
            Layout(fan_in_ndim=2, fan_out_ndim=1, embedding=False)
        """
        if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
            raise ValueError(
                f"layout {spec!r} is not a layout string; expected stack axes 's', then fan-in axes "
                "'i' (or one embedding row axis 'v'), then fan-out axes 'o', e.g. 'io', 'sio', 'ioo', "
                "'iiio' or 'vo'"
            )
        return cls(
            fan_in_ndim=max(spec.count("i"), spec.count("v")),
            fan_out_ndim=spec.count("o"),
            embedding="v" in spec,
        )

    def spec(self, ndim: int) -> str:
        """The layout string for a weight with ``ndim`` axes."""
        stack = ndim - self.fan_in_ndim - self.fan_out_ndim
        row = "v" if self.embedding else "i" * self.fan_in_ndim
        return "s" * stack + row + "o" * self.fan_out_ndim

    def stack_ndim(self, weight_shape: tuple[int, ...]) -> int:
        """Number of leading stack axes of a weight of this layout."""
        return len(weight_shape) - self.fan_in_ndim - self.fan_out_ndim

    def split(self, weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """Splits a weight shape into ``(stack, fan_in, fan_out)`` shapes."""
        s = self.stack_ndim(weight_shape)
        i = s + self.fan_in_ndim
        return weight_shape[:s], weight_shape[s:i], weight_shape[i:]

    def factor_shapes(
        self, weight_shape: tuple[int, ...], rank: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``a`` and ``b`` for a weight of this layout.

        Example:
            >>> Layout.parse("ioo").factor_shapes((64, 4, 16), rank=8)
            ((64, 8), (8, 4, 16))
        """
        stack, fan_in, fan_out = self.split(weight_shape)
        return (*stack, *fan_in, rank), (*stack, rank, *fan_out)

    def max_rank(self, weight_shape: tuple[int, ...]) -> int:
        """The largest useful rank: ``min(prod(fan_in), prod(fan_out))``."""
        _, fan_in, fan_out = self.split(weight_shape)
        return min(math.prod(fan_in), math.prod(fan_out))
