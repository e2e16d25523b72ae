"""Turning an NNX layer into its adapted form in place, and back.

An adapted layer is the *same object* with its class switched to a subclass of its own class
(``LoraLinear`` for ``nnx.Linear``, ``LoraMyLinear`` for a user's ``MyLinear(nnx.Linear)``), so
``isinstance(layer, nnx.Linear)`` still holds, every reference to it (shared or tied layers) sees
the change, and its weight keeps its path. The subclass adds the LoRA term to the output of the
original ``__call__`` (and ``attend`` for ``nnx.Embed``). It gains these attributes:

* ``lora_a``, ``lora_b``: :class:`LoraParam` factors; their metadata holds ``lora_scale``,
  ``lora_layout`` and ``lora_weight`` (the adapted attribute's name), so a state of factors alone converts back to
  :class:`jlora.LoraFactors`.
* ``lora_dropout``: the LoRA dropout rate (0 for embeddings: a lookup has no input to drop).
* ``lora_path``: the weight's module path, for error messages.
* with dropout only: ``deterministic`` (as ``nnx.Dropout``: False trains with dropout;
  ``model.eval()``, ``model.train()`` and ``nnx.view(model, deterministic=...)`` switch it) and
  ``lora_rngs``, an ``nnx.RngStream`` forked from the ``dropout`` stream (None without one).
"""

from __future__ import annotations

import types
from typing import Any

from flax import nnx

from .._errors import AdapterMismatchError, MissingRngError, TargetError
from .._factors import LoraFactors
from ..quant._layers import nnx_base
from ._kinds import Kind, factors_of, is_adapted_class
from ._sharding import explicit_out_like, new_factor

ADDED = ("lora_a", "lora_b", "lora_dropout", "lora_path", "deterministic", "lora_rngs")
ADDED += ("lora_magnitude",)  # DoRA layers only (jlora.nnx._dora)
_CLASSES: dict[tuple[type, Kind], type] = {}
_MIXINS: dict[Kind, type] = {}


class LoraParam(nnx.Variable):
    """A LoRA factor (``a`` or ``b``) in an NNX model.

    It subclasses ``nnx.Variable``, not ``nnx.Param``, on purpose: ``nnx.Param`` filters
    (``nnx.state(model, nnx.Param)``, ``nnx.Optimizer(..., wrt=nnx.Param)``) see the frozen base
    only, and ``wrt=LoraParam`` sees the factors only. Its metadata holds the adapter's static
    ``lora_scale`` and ``lora_layout`` and the adapted attribute's name ``lora_weight`` (prefixed,
    because ``nnx.Variable`` resolves unknown attributes to metadata before the array's own).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> issubclass(LoraParam, nnx.Param)
        False
        >>> LoraParam(jnp.zeros((3, 2)), lora_scale=2.0).get_metadata()["lora_scale"]
        2.0
    """


def _rate_and_rng(module: Any) -> tuple[float, Any]:
    rate = module.lora_dropout
    if rate == 0.0 or module.deterministic:
        return 0.0, None
    if module.lora_rngs is None:
        raise MissingRngError(
            f"{module.lora_path}: LoRA dropout is {rate} and the layer is in train mode "
            "(deterministic=False) but it holds no 'dropout' rng stream. Adapt the model with "
            "rngs=nnx.Rngs(params=..., dropout=...) to train with dropout, or switch dropout off "
            "for evaluation with model.eval() or nnx.view(model, deterministic=True)"
        )
    return rate, module.lora_rngs()


def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``: ``deterministic=True`` switches LoRA dropout off.

    Args:
        deterministic: if True, the adapter's input is not dropped.
    """
    if deterministic is not None and "deterministic" in vars(self):
        self.deterministic = deterministic


# Overrides of a layer's methods that are running, innermost last, and whether each reached the
# layer's own method (where the term is added). Python state at trace time only.
_PENDING: list[list[bool]] = []


def _with_term(own: Any, term: Any) -> Any:
    def method(self, inputs, *args, **kwargs):
        # A quantised kernel: the base product dequantises block by block (jlora.quant).
        y = nnx_base(own, self, (inputs, *args), kwargs)
        y = own(self, inputs, *args, **kwargs) if y is None else y
        if _PENDING:
            _PENDING[-1][0] = True
        rate, rng = _rate_and_rng(self)
        f = factors_of(self)
        if "lora_magnitude" in vars(self):  # a DoRA layer
            from ._dora import dora_call  # imports this module

            return dora_call(self, term, inputs, y, f, rate, rng, args, kwargs)

        def compute(inputs, a, b, rng):
            factors = LoraFactors(a, b, f.scale, f.layout)
            return term(self, inputs, y.dtype, factors, rate, rng, *args, **kwargs)

        return y + explicit_out_like(compute, y)(inputs, f.a, f.b, rng)

    method.__name__ = method.__qualname__ = own.__name__
    method.__doc__ = own.__doc__
    return method


def _checked(override: Any, kind: Kind) -> Any:
    def method(self, *args, **kwargs):
        _PENDING.append([False])
        try:
            y = override(self, *args, **kwargs)
            reached = _PENDING[-1][0]
        finally:
            _PENDING.pop()
        if not reached:
            raise AdapterMismatchError(
                f"{self.lora_path}: {type(self).__dict__['_jlora_base'].__qualname__}."
                f"{override.__name__} overrides {kind.name}.{override.__name__} without calling "
                f"it (super().{override.__name__}(...)), so the LoRA term has no place where it "
                "equals the merged layer. Call the parent's method, declare the layer with "
                "layers={cls: jlora.CustomLayer(...)}, or exclude this path"
            )
        return y

    method.__name__ = method.__qualname__ = override.__name__
    return method


def _mixin(kind: Kind) -> type:
    """``kind.cls`` with the term added to its own methods (one class per kind)."""
    cls = _MIXINS.get(kind)
    if cls is None:
        methods = {m: _with_term(getattr(kind.cls, m), t) for m, t in kind.terms}

        def body(ns: dict[str, Any]) -> None:
            ns.update(methods, set_view=set_view, __module__="jlora.nnx")

        cls = types.new_class(f"Lora{kind.cls.__name__}", (kind.cls,), exec_body=body)
        _MIXINS[kind] = cls
    return cls


def adapted_class(base: type, kind: Kind) -> type:
    """The adapted subclass of ``base`` (one per base class and kind, so jit caches stay warm).

    For a subclass of the kind's class, the class sits between the subclass and a copy of the
    kind's class with the term added (Python's MRO puts it there), so an override that calls
    ``super().__call__`` reaches the term inside that call.
    """
    cls = _CLASSES.get((base, kind))
    if cls is None:
        mixin = _mixin(kind)
        overrides = {
            m: _checked(getattr(base, m), kind)
            for m in kind.methods
            if getattr(base, m) is not getattr(kind.cls, m)
        }

        def body(ns: dict[str, Any]) -> None:
            ns.update(overrides, _jlora_base=base, _jlora_kind=kind, __module__="jlora.nnx")

        parents = (mixin,) if base is kind.cls else (base, mixin)
        cls = types.new_class(f"Lora{base.__name__}", parents, exec_body=body)
        _CLASSES[(base, kind)] = cls
    return cls


def is_adapted(module: Any) -> bool:
    """Whether ``module`` is an adapted layer."""
    return is_adapted_class(type(module))


def check_free(module: Any, path: str) -> None:
    """Raises :class:`TargetError` if ``module`` already has an attribute adapting would add."""
    taken = [name for name in ADDED if name in vars(module)]
    if taken:
        raise TargetError(
            f"{path}: the {type(module).__name__} already has attribute(s) {taken}, which "
            "jlora.nnx would add; rename them, or exclude this path"
        )


def attach(
    module: Any,
    path: str,
    kind: Kind,
    factors: LoraFactors,
    rate: float,
    stream: Any,
    sharding: tuple[dict[str, Any], dict[str, Any]] = ({}, {}),
) -> None:
    """Adapts ``module`` in place with ``factors``; ``stream`` feeds LoRA dropout (or None);
    ``sharding`` is the factors' sharding metadata (:func:`jlora.nnx._sharding.factor_metadata`),
    and they are created on their shardings as Flax creates a variable with that metadata."""
    weight = getattr(module, kind.weight).get_value()
    meta = {"lora_scale": factors.scale, "lora_layout": factors.layout, "lora_weight": kind.weight}
    a = new_factor(LoraParam, factors.a, {**meta, **sharding[0]}, weight, "a")
    b = new_factor(LoraParam, factors.b, {**meta, **sharding[1]}, weight, "b")
    object.__setattr__(module, "__class__", adapted_class(type(module), kind))
    module.lora_a, module.lora_b = a, b
    module.lora_path = path
    module.lora_dropout = 0.0 if factors.layout.embedding else rate
    if module.lora_dropout > 0:
        module.deterministic = False
        module.lora_rngs = stream


def detach(module: Any) -> None:
    """Removes the adapter attributes and restores the module's original class."""
    for name in ADDED:
        if name in vars(module):
            delattr(module, name)
    object.__setattr__(module, "__class__", type(module).__dict__["_jlora_base"])


def weight_of(module: Any) -> Any:
    """The adapted weight Variable of an adapted module."""
    return getattr(module, module.lora_a.get_metadata()["lora_weight"])
