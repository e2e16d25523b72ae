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

from ._errors import MissingRngError, TargetError
from ._factors import LoraFactors
from ._nnx_kinds import ATTEND_TERM, Kind, factors_of, is_adapted_class

ADDED = ("lora_a", "lora_b", "lora_dropout", "lora_path", "deterministic", "lora_rngs")
_CLASSES: dict[type, type] = {}


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


def _methods(base: type, kind: Kind) -> dict[str, Any]:
    def __call__(self, inputs, *args, **kwargs):
        y = base.__call__(self, inputs, *args, **kwargs)
        rate, rng = _rate_and_rng(self)
        return y + kind.term(self, inputs, y.dtype, factors_of(self), rate, rng, *args, **kwargs)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``: ``deterministic=True`` switches LoRA dropout off.

        Args:
            deterministic: if True, the adapter's input is not dropped.
        """
        if deterministic is not None and "deterministic" in vars(self):
            self.deterministic = deterministic

    methods: dict[str, Any] = {"__call__": __call__, "set_view": set_view}
    if kind.name == "nnx.Embed":

        def attend(self, query, *args, **kwargs):
            y = base.attend(self, query, *args, **kwargs)
            return y + ATTEND_TERM(self, query, y.dtype, factors_of(self), 0.0, None)

        methods["attend"] = attend
    return methods


def adapted_class(base: type, kind: Kind) -> type:
    """The adapted subclass of ``base`` (one per base class, so jit caches stay warm)."""
    cls = _CLASSES.get(base)
    if cls is None:

        def body(ns: dict[str, Any]) -> None:
            ns.update(_methods(base, kind))
            ns["__module__"] = "jlora.nnx"
            ns["_jlora_base"] = base

        cls = types.new_class(f"Lora{base.__name__}", (base,), exec_body=body)
        _CLASSES[base] = cls
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
    module: Any, path: str, kind: Kind, factors: LoraFactors, rate: float, stream: Any
) -> None:
    """Adapts ``module`` in place with ``factors``; ``stream`` feeds LoRA dropout (or None)."""
    object.__setattr__(module, "__class__", adapted_class(type(module), kind))
    meta = {"lora_scale": factors.scale, "lora_layout": factors.layout, "lora_weight": kind.weight}
    module.lora_a = LoraParam(factors.a, **meta)
    module.lora_b = LoraParam(factors.b, **meta)
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
