"""`CustomLayer`: how a module kind jlora does not know uses its weight.

The Flax transforms adapt their frameworks' own layers out of the box. For any other layer, a user
says which parameter it multiplies its input by, with which layout, and (if it is not a plain
contraction of the input's trailing axes) how to compute the factored term; the transforms then
treat it like a built-in layer, its subclasses included:

    >>> import jlora
    >>> conv1d = jlora.CustomLayer(param="kernel", layout="oi")  # GPT-2's (out, in) kernel

An einsum layer that takes its equation at call time or holds it (Google's Gemma:
``Einsum.__call__(self, eqn, x)``) is declared by where the equation and the input are; its layout
then comes from the equation, as for Flax's own einsum layers:

    >>> gemma_einsum = jlora.CustomLayer(param="w", equation=0, input=1)

Either is passed as ``jlora.linen.lora(model, config, layers={FlaxConv1D: conv1d})`` or
``jlora.nnx.lora(model, config, rngs=..., layers={MyLinear: ...})``. The mapping is an argument,
not a global registry, so two models in one process never see each other's declarations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from . import ops
from ._errors import ConfigError
from ._factors import LoraFactors
from ._layout import Layout

Term = Callable[[Any, jax.Array, LoraFactors], jax.Array]


def dense_term(module: Any, x: jax.Array, factors: LoraFactors) -> jax.Array:
    """The default term: ``scale * (x a) b``, contracting ``x``'s trailing fan-in axes."""
    return ops.dense_branch(x, factors)


@dataclasses.dataclass(frozen=True)
class CustomLayer:
    """How a layer kind unknown to jlora uses its weight, for the Flax transforms' ``layers=``.

    The layer must compute its output as a function of its first argument ``x`` that is linear in
    the weight (``x @ W``, a transposed product, an einsum...), so that adding ``term(x)`` for the
    delta equals using ``W0 + delta``.

    Attributes:
        param: the name of the weight the layer reads (``self.param(...)`` in Linen, the
            attribute in NNX). Module-name targets select ``kernel`` and ``embedding`` leaves
            only; target another name with a regex (``".*q/w"``).
        layout: the weight's layout string (:class:`jlora.Layout`), e.g. ``"oi"`` for a kernel
            stored ``(out, in)``. Extra leading axes (stacked layers) are stack axes.
        methods: the methods whose output gets the term.
        term: ``(module, x, factors) -> array``, the term for input ``x`` (after LoRA dropout) and
            one layer's factors ``a: (*fan_in, r)``, ``b: (r, *fan_out)``. The default contracts
            ``x``'s trailing axes with ``a``: :func:`jlora.ops.dense_branch`.
        input: which call argument is the layer's input: a position or a keyword name.
        equation: for an einsum layer, where its equation ``'<input>,<kernel>-><output>'`` is: a
            call argument (position or keyword name) or, for a name the call does not pass, the
            module attribute holding it (NNX adapts without calling a layer, so there it must be
            an attribute). The layout then comes from the equation (``LoraConfig.layouts`` may
            choose other roles, as for ``nn.Einsum``) and the term is the einsum's factored form.

    Raises:
        ConfigError: a field is invalid.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> layer = jlora.CustomLayer(layout="oi")
        >>> f = jlora.LoraFactors(jnp.ones((3, 1)), jnp.ones((1, 2)), 1.0, jlora.Layout.parse("oi"))
        >>> layer.compute(None, jnp.ones((4, 3)), f).shape
        (4, 2)
    """

    param: str = "kernel"
    layout: str = "io"
    methods: tuple[str, ...] = ("__call__",)
    term: Term | None = None
    input: int | str = 0
    equation: int | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param:
            raise ConfigError(f"CustomLayer.param: {self.param!r} is not a parameter name")
        try:
            parsed = Layout.parse(self.layout)
        except ValueError as e:
            raise ConfigError(f"CustomLayer.layout: {e}") from None
        if parsed.embedding:
            raise ConfigError(
                "CustomLayer.layout: 'vo' (an embedding lookup) needs a term that indexes the "
                "table; subclass flax's Embed instead, which jlora adapts"
            )
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        if not methods or not all(isinstance(m, str) for m in methods):
            raise ConfigError(
                f"CustomLayer.methods: {self.methods!r}; expected method names, e.g. ('__call__',)"
            )
        object.__setattr__(self, "methods", methods)
        for name in ("input", "equation"):
            value = getattr(self, name)
            if value is None and name == "equation":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
                raise ConfigError(
                    f"CustomLayer.{name}: {value!r}; expected a call argument's position (int) or "
                    "name (str)"
                )
        if self.equation is not None and (self.term is not None or self.layout != "io"):
            raise ConfigError(
                "CustomLayer: an einsum layer (equation=...) takes its layout from the equation "
                "and its term from the einsum; leave layout and term unset (choose other roles "
                "with LoraConfig.layouts)"
            )
        if self.term is not None and not callable(self.term):
            raise ConfigError(
                f"CustomLayer.term: {self.term!r} is not callable; expected "
                "(module, x, factors) -> array, or None for x @ (a @ b)"
            )

    @property
    def parsed_layout(self) -> Layout:
        """The layout as a :class:`jlora.Layout`."""
        return Layout.parse(self.layout)

    def compute(self, module: Any, x: jax.Array, factors: LoraFactors) -> jax.Array:
        """The LoRA term for input ``x`` (already dropped out)."""
        return (self.term or dense_term)(module, x, factors)


def check_layers(where: str, layers: Any) -> dict[type, CustomLayer]:
    """Validates a ``layers=`` argument: ``{module class: CustomLayer}``."""
    if layers is None:
        return {}
    if not isinstance(layers, Mapping):
        raise TypeError(
            f"{where}: layers= takes a mapping {{module class: jlora.CustomLayer(...)}}, got "
            f"{type(layers).__name__}"
        )
    for cls, layer in layers.items():
        if not isinstance(cls, type):
            raise TypeError(
                f"{where}: layers= key {cls!r} is not a class; expected the module class, e.g. "
                "{FlaxConv1D: jlora.CustomLayer(layout='oi')}"
            )
        if not isinstance(layer, CustomLayer):
            raise TypeError(
                f"{where}: layers[{cls.__qualname__}] is a {type(layer).__name__}; expected a "
                "jlora.CustomLayer(param=..., layout=...)"
            )
    return dict(layers)


def call_argument(where: int | str, args: tuple, kwargs: dict, what: str) -> Any:
    """The call argument at position or keyword ``where``; raises KeyError naming ``what``."""
    if isinstance(where, int):
        if where < len(args):
            return args[where]
    elif where in kwargs:
        return kwargs[where]
    raise KeyError(
        f"the layer was called with {len(args)} positional argument(s) and keywords "
        f"{sorted(kwargs)}, but its CustomLayer declares the {what} at {where!r}"
    )


def equation_of(layer: CustomLayer, module: Any, args: tuple, kwargs: dict) -> str:
    """The einsum equation of a declared einsum layer, from the call or the module."""
    where = layer.equation
    if isinstance(where, str) and where not in kwargs and hasattr(module, where):
        return getattr(module, where)
    return call_argument(where, args, kwargs, "equation")
