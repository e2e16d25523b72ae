"""The kind (:mod:`jlora.nnx._kinds`) of a layer declared with
``layers={cls: jlora.CustomLayer(...)}``: its weight, its layout (given, or read from an einsum
equation the module holds), and its term."""

from __future__ import annotations

from typing import Any

from .. import _einsum, ops
from .._custom import CustomLayer, call_argument, equation_of
from .._errors import AdapterMismatchError, TargetError
from .._layout import Layout
from ._kinds import Kind, _equation, _floating

_CUSTOM: dict[tuple[type, CustomLayer], Kind] = {}


def custom_kind(cls: type, layer: CustomLayer) -> Kind:
    """The :class:`Kind` of a layer declared with :class:`jlora.CustomLayer` (one per pair, so
    adapted classes, and with them compiled programs, are reused across calls)."""
    kind = _CUSTOM.get((cls, layer))
    if kind is None:
        kind = _CUSTOM[(cls, layer)] = _custom_kind(cls, layer)
    return kind


def _custom_kind(cls: type, layer: CustomLayer) -> Kind:
    name = f"{cls.__module__}.{cls.__qualname__}"

    def argument(module, where, args, kwargs, what):
        try:
            return call_argument(where, args, kwargs, what)
        except KeyError as e:
            raise AdapterMismatchError(
                f"{getattr(module, 'lora_path', name)}: {e.args[0]}"
            ) from None

    def held_equation(module: Any, path: str) -> _einsum.Equation:
        where = layer.equation
        if not isinstance(where, str) or not isinstance(getattr(module, where, None), str):
            raise TargetError(
                f"{path}: {name} declares its equation at {where!r}, but jlora.nnx adapts a layer "
                "without calling it, so the equation must be a string attribute of the module "
                "(CustomLayer(equation='einsum_str'))"
            )
        return _equation(getattr(module, where), path)

    def spec(module: Any, path: str) -> str:
        return layer.layout if layer.equation is None else held_equation(module, path).roles

    def choose(module: Any, path: str, chosen: Layout) -> str:
        eq = held_equation(module, path)
        try:
            return _einsum.layout_for(eq, chosen).roles(len(eq.kernel))
        except _einsum.EinsumUnsupported as e:
            raise TargetError(f"{path}: {e}") from None

    def term(module, inputs, dtype, f, rate, rng, *args, **kwargs):
        call = (inputs, *args)
        x = ops.dropout(
            _floating(argument(module, layer.input, call, kwargs, "input"), dtype), rate, rng
        )
        if layer.equation is None:
            return layer.compute(module, x, f)
        text = equation_of(layer, module, call, kwargs)
        eq = _equation(text, getattr(module, "lora_path", name))
        return _einsum.term(eq, f.layout, x, f.a, f.b, f.scale)

    terms = tuple((m, term) for m in layer.methods)
    return Kind(name, layer.param, spec, terms, None if layer.equation is None else choose, cls)
