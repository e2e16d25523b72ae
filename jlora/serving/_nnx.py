"""Mixed-adapter batches for ``flax.nnx`` models: :func:`nnx_apply`.

Works as :mod:`jlora.nnx` does (each adapted layer's class is switched to a subclass of its own,
so every reference to the layer sees it), but only for the length of one call, and the subclass
adds the per-example term of :mod:`jlora.serving`'s ops to the original method's output. The
model is never modified: the classes are switched back when the call returns or raises, and the
bank factors and ids live in a Python-side record of the call (nothing is assigned to the model,
so it works on a model closed over by ``jax.jit`` as well as inside ``nnx.jit``).

A banked layer met by a copy of itself (an ``nnx.scan``, ``nnx.vmap`` or ``nnx.remat`` *inside*
the model splits and merges its modules) is not in the record: it raises rather than run without
its term. Stacked (``nnx.vmap``-created) weights are refused up front for the same reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .._errors import AdapterMismatchError, BankError, TargetError
from .._layout import Layout
from .._paths import leaves_with_paths
from ..nnx._convert import flat_variables, join, node
from ..nnx._kinds import Kind, is_adapted_class, kind_of
from ._bank import AdapterBank
from ._mixed import STRATEGIES, attend_term, check_ids, dense_term, einsum_term, lookup_term
from ._slots import BankFactors

_KINDS = ("nnx.Linear", "nnx.LinearGeneral", "nnx.Einsum", "nnx.Embed")


@dataclasses.dataclass
class _Call:
    """One running :func:`nnx_apply`: ``{id(layer): (path, factors)}``, the ids, the strategy."""

    layers: dict[int, tuple[str, BankFactors]]
    ids: jax.Array
    strategy: str


_ACTIVE: list[_Call] = []  # running calls, innermost last (Python state at trace time only)
_REACHED: list[list[bool]] = []  # per running subclass override: did it reach the term?
_CLASSES: dict[tuple[type, Kind], type] = {}


def _arg(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs[name]


def _term(kind: Kind, module: Any, method: str, args: tuple, kwargs: dict, dtype: Any) -> Any:
    call = _ACTIVE[-1] if _ACTIVE else None
    entry = call.layers.get(id(module)) if call else None
    if entry is None:
        raise AdapterMismatchError(
            f"a banked {kind.name} ran outside its jlora.serving.nnx_apply call: in a copy made "
            "by an NNX transform inside the model (nnx.scan, nnx.vmap, nnx.remat)? nnx_apply "
            "adapts the layers the model calls directly; leave this layer out of the bank"
        )
    path, f = entry
    if kind.name == "nnx.Embed":
        if method == "attend":
            return attend_term(jnp.asarray(_arg(args, kwargs, "query"), dtype), call.ids, f)
        tokens = _arg(args, kwargs, "inputs")
        if module.num_embeddings == 1:  # nnx.Embed broadcasts its single row whatever the ids
            tokens = jnp.zeros(tokens.shape, jnp.int32)
        return lookup_term(tokens, call.ids, f)
    x = jnp.asarray(_arg(args, kwargs, "inputs"), dtype)
    if kind.name == "nnx.Einsum":
        equation = (args[1] if len(args) > 1 else kwargs.get("einsum_str")) or module.einsum_str
        return einsum_term(equation, x, call.ids, f)
    if kind.name == "nnx.LinearGeneral":
        axes = sorted(a % x.ndim for a in module.axis)
        if 0 in axes:
            raise AdapterMismatchError(
                f"{path}: nnx.LinearGeneral contracts axis 0, the batch axis; a per-example "
                "adapter needs the examples on the input's first, free axis"
            )
        x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    return dense_term(x, call.ids, f, strategy=call.strategy)


def _with_term(kind: Kind, name: str) -> Callable[..., Any]:
    own = getattr(kind.cls, name)

    def method(self, *args, **kwargs):
        y = own(self, *args, **kwargs)
        if _REACHED:
            _REACHED[-1][0] = True
        return y + _term(kind, self, name, args, kwargs, y.dtype).astype(y.dtype)

    method.__name__ = method.__qualname__ = name
    return method


def _checked(override: Callable[..., Any], kind: Kind) -> Callable[..., Any]:
    def method(self, *args, **kwargs):
        _REACHED.append([False])
        try:
            y = override(self, *args, **kwargs)
            reached = _REACHED[-1][0]
        finally:
            _REACHED.pop()
        if not reached:
            path = _ACTIVE[-1].layers[id(self)][0] if _ACTIVE else type(self).__name__
            raise AdapterMismatchError(
                f"{path}: {override.__qualname__} overrides {kind.name}.{override.__name__} "
                "without calling it, so the per-example term has no place to go; call the "
                "parent's method, or leave this layer out of the bank"
            )
        return y

    method.__name__ = method.__qualname__ = override.__name__
    return method


def _mixed_class(base: type, kind: Kind) -> type:
    """``base`` with the term added to ``kind.cls``'s own methods (cached: jit caches stay warm)."""
    cls = _CLASSES.get((base, kind))
    if cls is None:
        methods = {m: _with_term(kind, m) for m in kind.methods}
        if base is not kind.cls:  # the mixin sits between base and kind.cls in the MRO
            mixin = _mixed_class(kind.cls, kind)
            methods = {
                m: _checked(getattr(base, m), kind)
                for m in kind.methods
                if getattr(base, m) is not getattr(kind.cls, m)
            }
        parents = (kind.cls,) if base is kind.cls else (base, mixin)
        cls = types.new_class(
            f"Mixed{base.__name__}",
            parents,
            exec_body=lambda ns: ns.update(methods, __module__="jlora.serving"),
        )
        _CLASSES[(base, kind)] = cls
    return cls


def _layer(model: Any, parts: tuple, path: str, bank: BankFactors) -> tuple[Any, Kind]:
    """The layer owning ``path`` and its kind, checked against its bank factors."""
    module = node(model, parts[:-1])
    if is_adapted_class(type(module)):
        raise AdapterMismatchError(
            f"{path}: this layer already has jlora.nnx LoRA factors; serve the plain base model "
            "(jlora.nnx.merge it, or keep an unadapted copy) with the adapters in the bank"
        )
    kind = kind_of(module)
    if kind is None or kind.name not in _KINDS or parts[-1] != kind.weight:
        what = type(module).__qualname__ if kind is None else kind.name
        raise AdapterMismatchError(
            f"{path}: a weight of a {what}; mixed-adapter batches adapt the weights of "
            f"{_KINDS}. Leave this path out of the bank (serve it merged)"
        )
    try:
        spec = kind.spec(module, path)  # the layer's own axes (an einsum's shared letters: "s")
        if kind.choose is not None and bank.layout != Layout.parse(spec):
            spec = kind.choose(module, path, bank.layout)
    except TargetError as e:
        raise AdapterMismatchError(f"{path}: the bank cannot adapt this layer: {e}") from None
    expected = Layout.parse(spec)
    shape, rank = tuple(getattr(module, kind.weight).shape), bank.a.shape[-1]
    if len(shape) > len(spec):
        raise AdapterMismatchError(
            f"{path}: a stacked weight of shape {shape} (nnx.vmap layers); nnx_apply adapts "
            "layers the model calls directly. Serve the stack with jlora.serving.apply (Linen) or "
            "leave it out of the bank"
        )
    n = bank.a.shape[0]
    found = (tuple(bank.a.shape), tuple(bank.b.shape))
    wanted = tuple((n, *s) for s in expected.factor_shapes(shape, rank))
    if bank.layout != expected or found != wanted:
        raise AdapterMismatchError(
            f"{path}: bank factors a {found[0]}, b {found[1]} (layout {bank.layout}) do not fit "
            f"this {kind.name} weight of shape {shape} (layout {expected}); was the bank made for "
            "another model?"
        )
    return module, kind


@contextlib.contextmanager
def _mixing(model: Any, factors: Any, ids: jax.Array, strategy: str) -> Iterator[None]:
    weights = {join(parts): parts for parts, _ in flat_variables(nnx.state(model, nnx.Param))}
    layers, switched = {}, []
    for path, bank in leaves_with_paths(factors, is_leaf=lambda x: isinstance(x, BankFactors)):
        if not isinstance(bank, BankFactors):
            raise AdapterMismatchError(
                f"{path}: the bank factors hold a {type(bank).__name__}; pass AdapterBank.factors"
            )
        if path not in weights:
            raise AdapterMismatchError(
                f"{path}: the bank adapts this path but the model has no such nnx.Param; was the "
                "bank made for another model?"
            )
        module, kind = _layer(model, weights[path], path, bank)
        layers[id(module)] = (path, bank)
        switched.append((module, type(module), kind))
    _ACTIVE.append(_Call(layers, ids, strategy))
    try:
        for module, cls, kind in switched:
            object.__setattr__(module, "__class__", _mixed_class(cls, kind))
        yield
    finally:
        for module, cls, _ in switched:
            object.__setattr__(module, "__class__", cls)
        _ACTIVE.pop()


def nnx_apply(
    model: nnx.Module,
    bank: AdapterBank | Any,
    ids: jax.Array,
    *args: Any,
    method: str | Callable[..., Any] | None = None,
    strategy: str = "gather",
    **kwargs: Any,
) -> Any:
    """Runs an NNX model on a batch whose examples each use their own adapter from ``bank``.

    Each banked ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Embed`` (lookup and
    ``attend``) computes its base output once for the whole batch and adds, per example,
    ``scale[id] * (x a[id]) b[id]`` (the kind's equivalent for lookups, heads and einsums).
    Example ``e`` equals the model adapted by ``jlora.nnx`` with adapter ``ids[e]`` alone, to
    float32 round-off; :data:`jlora.serving.BASE` examples get the base model. Build the bank
    from ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` and adapters as
    ``jlora.nnx.to_adapters`` gives them.

    Args:
        model: the plain base model (not adapted by ``jlora.nnx``); it is left unchanged.
        bank: an :class:`AdapterBank` (ids are then checked against its occupied slots when
            concrete), or its :attr:`~AdapterBank.factors` (what a jitted function takes).
        ids: ``(B,)`` int adapter ids, one per example (the inputs' leading axis); None when
            ``bank`` is factors already gathered per example (:func:`jlora.serving.gather`).
        *args: the call's inputs.
        method: the method to run: None for ``model(...)``, a method name, or a function
            ``method(model, *args, **kwargs)``.
        strategy: how dense terms are computed (see :func:`jlora.serving.dense_term`).
        **kwargs: the call's keyword inputs.

    Returns:
        What the method returns.

    Raises:
        BankError: ``ids`` of the wrong shape, or (eagerly) out of range or naming an empty slot.
        AdapterMismatchError: a bank made for another model, a banked layer of another kind, a
            stacked or jlora.nnx-adapted layer, or one run in a copy made inside the model.

    Example:
        >>> import jax, jax.numpy as jnp, jlora, jlora.nnx
        >>> from flax import nnx
        >>> from jlora.serving import AdapterBank, nnx_apply
        >>> model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
        >>> params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        >>> one = jlora.init(jax.random.key(1), params, jlora.LoraConfig(targets="kernel", rank=2))
        >>> bank = AdapterBank.build(params, {"one": one}, capacity=2)
        >>> run = nnx.jit(lambda m, f, ids, x: nnx_apply(m, f, ids, x))
        >>> run(model, bank.factors, bank.ids(["one", None, "one"]), jnp.ones((3, 6))).shape
        (3, 4)
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"jlora.serving.nnx_apply: expected a flax.nnx.Module, got {type(model).__name__}; "
            "for a flax.linen model use jlora.serving.apply"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"jlora.serving.nnx_apply: strategy {strategy!r}; expected {STRATEGIES}")
    ids = None if ids is None else jnp.asarray(ids)  # None: factors gathered per example
    if isinstance(bank, AdapterBank):
        if ids is None:
            raise BankError(
                "jlora.serving.nnx_apply: ids=None is for factors gathered per example "
                "(jlora.serving.gather(bank.factors, ids)); with an AdapterBank pass the ids"
            )
        check_ids(ids, ids.shape[0] if ids.ndim else -1, bank.capacity, "jlora.serving.nnx_apply")
        if not isinstance(ids, jax.core.Tracer):
            bank.check_ids(ids)
        bank = bank.factors
    with _mixing(model, bank, ids, strategy):  # methods are looked up on the switched classes
        if method is None:
            return model(*args, **kwargs)
        if isinstance(method, str):
            return getattr(model, method)(*args, **kwargs)
        return method(model, *args, **kwargs)
