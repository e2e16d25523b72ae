"""What a layer kind is (:class:`LayerKind`), and the kind of a ``CustomLayer`` declaration.

A kind says which parameter of a module jlora adapts, which methods get the LoRA term, the
weight's layout and how to compute the term; the built-in kinds (``nn.Dense``, ...) are in
:mod:`jlora.linen._layers`, and :func:`custom_kind` builds one from a :class:`jlora.CustomLayer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from .. import _einsum, ops
from .._custom import CustomLayer, call_argument, equation_of
from .._layout import Layout


class Unsupported(Exception):  # an internal signal; never escapes jlora.linen
    """A supported module kind configured in a way jlora cannot adapt (the reason is the message)."""


Term = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one module kind is adapted.

    Attributes:
        name: the kind's name in messages (``nn.Dense``).
        param: the adapted parameter's name.
        methods: the methods whose output gets the LoRA term.
        layout: ``(module, method, args, kwargs) -> Layout`` (raises :class:`Unsupported`).
        term: ``(module, method, args, kwargs, factors, rate, rng) -> term``.
        undropped: methods whose input is not an activation (a lookup's ids): no LoRA dropout.
        choose: ``(module, method, args, kwargs, chosen) -> Layout``: the layout to use when
            ``LoraConfig.layouts`` gives one for the weight (raises :class:`Unsupported` if it
            does not fit); None for kinds whose layout is fixed by the module.
        linear: whether the layer is a linear (Dense-like) layer, for the ``"all-linear"`` preset.
        cls: the class whose own ``methods`` get the term. A subclass's override that calls
            ``super().__call__`` gets it inside that call, where it equals the merged layer.
    """

    name: str
    param: str
    methods: tuple[str, ...]
    layout: Callable[..., Layout]
    term: Term
    undropped: tuple[str, ...] = ()
    choose: Callable[..., Layout] | None = None
    cls: type | None = None
    linear: bool = True


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


def custom_kind(cls: type, layer: CustomLayer) -> LayerKind:
    """The :class:`LayerKind` of a layer declared with :class:`jlora.CustomLayer`."""

    def argument(where, args, kwargs, what):
        try:
            return call_argument(where, args, kwargs, what)
        except KeyError as e:
            raise Unsupported(e.args[0]) from None

    def equation(module, args, kwargs) -> _einsum.Equation:
        try:
            text = equation_of(layer, module, args, kwargs)
            return _einsum.parse(text)
        except KeyError as e:
            raise Unsupported(e.args[0]) from None
        except _einsum.EinsumUnsupported as e:
            raise Unsupported(f"{e}. Exclude this path") from None

    def layout(module, method, args, kwargs) -> Layout:
        if layer.equation is None:
            return layer.parsed_layout
        return equation(module, args, kwargs).layout

    def choose(module, method, args, kwargs, chosen: Layout) -> Layout:
        try:
            return _einsum.layout_for(equation(module, args, kwargs), chosen)
        except _einsum.EinsumUnsupported as e:
            raise Unsupported(str(e)) from None

    def term(module, method, args, kwargs, factors, rate, rng):
        x = ops.dropout(argument(layer.input, args, kwargs, "input"), rate, rng)
        if layer.equation is None:
            return layer.compute(module, x, factors)
        eq = equation(module, args, kwargs)
        return _einsum.term(eq, factors.layout, x, factors.a, factors.b, factors.scale)

    name = f"{cls.__module__}.{cls.__qualname__}"
    return LayerKind(
        name,
        layer.param,
        layer.methods,
        layout,
        term,
        choose=None if layer.equation is None else choose,
        cls=cls,
    )
