"""Mixed-adapter batches for any ``flax.linen`` model: :func:`apply`.

Works as :mod:`jlora.linen` does (an ``nn.intercept_methods`` interceptor around the model's own
methods, factors riding in the ``params`` collection next to their weight, so ``nn.scan`` and
``nn.remat`` hand each layer its slice), but each adapted layer adds the per-example term of
:mod:`jlora.serving`'s ops. The bank axis ``N`` rides *after* the weight's stack axes
(``(*stack, N, *fan_in, R)``) so that a scan over layers slices the layers, not the adapters.
The ids reach every layer by closure: they are the same for all layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .._errors import AdapterMismatchError, BankError
from .._paths import leaves_with_paths, unbox
from ..linen._layer_kind import LayerKind, Unsupported
from ..linen._layers import kind_of, owns_call
from ._bank import AdapterBank
from ._mixed import STRATEGIES, attend_term, check_ids, dense_term, einsum_term, lookup_term
from ._slots import BankFactors

SUFFIX = "@bank"
_KINDS = ("nn.Dense", "nn.DenseGeneral", "nn.Einsum", "nn.Embed")


def _layer_slice(bank: BankFactors) -> BankFactors:
    """Bank factors as the layer sees them, ``(*shared, N, ...)``, with ``N`` moved first."""
    n_shared = bank.a.ndim - 2 - bank.layout.fan_in_ndim
    scale = bank.scale[(0,) * n_shared] if n_shared else bank.scale
    a, b = jnp.moveaxis(bank.a, n_shared, 0), jnp.moveaxis(bank.b, n_shared, 0)
    return BankFactors(a, b, scale, bank.layout)


def _arg(args: tuple, kwargs: dict, name: str) -> Any:
    return args[0] if args else kwargs[name]


def _term(kind: LayerKind, module, method, args, kwargs, f, ids, strategy, dtype, path):
    if kind.name == "nn.Embed":
        if method == "attend":
            return attend_term(jnp.asarray(_arg(args, kwargs, "query"), dtype), ids, f)
        tokens = _arg(args, kwargs, "inputs")
        if module.num_embeddings == 1:
            tokens = jnp.zeros(tokens.shape, jnp.int32)
        return lookup_term(tokens, ids, f)
    x = jnp.asarray(_arg(args, kwargs, "inputs"), dtype)
    if kind.name == "nn.Dense":
        return dense_term(x, ids, f, strategy=strategy)
    if kind.name == "nn.Einsum":
        equation = args[1] if len(args) > 1 else kwargs.get("einsum_str") or module.einsum_str
        return einsum_term(equation, x, ids, f)
    axis = tuple(
        a % x.ndim for a in ((module.axis,) if isinstance(module.axis, int) else module.axis)
    )
    if module.batch_dims != () or 0 in axis:
        raise AdapterMismatchError(
            f"{path}: nn.DenseGeneral with batch_dims={module.batch_dims}, axis={module.axis} has "
            "no per-example adapter term (the batch axis must be the input's first, free axis)"
        )
    moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    return dense_term(moved, ids, f, strategy=strategy)


class MixedApplier:
    """Interceptor adding each example's adapter term to every banked layer's output."""

    def __init__(self, ids: jax.Array, strategy: str, custom: tuple = ()) -> None:
        self.ids, self.strategy, self.custom = ids, strategy, custom
        self.used: set[str] = set()
        self.owners: set[str] = set()

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        kind = kind_of(module, self.custom)
        if kind is None or not owns_call(kind, context):
            return next_fun(*args, **kwargs)
        owner = "/".join(module.scope.path)
        self.owners.add(owner)
        bank = module.get_variable("params", kind.param + SUFFIX)
        y = next_fun(*args, **kwargs)
        if bank is None:
            return y
        path = f"{owner}/{kind.param}" if owner else kind.param
        if kind.name not in _KINDS:
            raise AdapterMismatchError(
                f"{path}: a {kind.name} layer; mixed-adapter batches support {_KINDS}. Leave this "
                "path out of the bank (serve it merged, or alone with jlora.linen)"
            )
        try:
            expected = kind.layout(module, method, args, kwargs)
            if kind.choose is not None:
                expected = kind.choose(module, method, args, kwargs, bank.layout)
        except Unsupported as e:
            raise AdapterMismatchError(f"{path}: the bank cannot adapt this layer: {e}") from None
        if expected != bank.layout:
            raise AdapterMismatchError(
                f"{path}: the bank's layout is {bank.layout} but this {kind.name} weight's is "
                f"{expected}; were the adapters made for another model?"
            )
        term = _term(
            kind, module, method, args, kwargs, _layer_slice(bank), self.ids, self.strategy,
            y.dtype, path,
        )  # fmt: skip
        self.used.add(path)
        return y + term.astype(y.dtype)


def inject(params: Any, factors: Any) -> dict[str, Any]:
    """A shallow copy of ``params`` with each bank entry at ``<weight path>@bank``."""
    root = dict(params)
    for path, bank in leaves_with_paths(factors, is_leaf=lambda x: isinstance(x, BankFactors)):
        if not isinstance(bank, BankFactors):
            raise AdapterMismatchError(
                f"{path}: the bank factors hold a {type(bank).__name__}; pass AdapterBank.factors"
            )
        *parents, name = path.split("/")
        node = root
        for key in parents:
            child = node.get(key) if isinstance(node, Mapping) else None
            if not isinstance(child, Mapping):
                node = None
                break
            node[key] = node = dict(child)
        if node is None or name not in node:
            raise AdapterMismatchError(
                f"{path}: the bank adapts this path but the params have no such weight; was the "
                "bank made for another model?"
            )
        weight = unbox(node[name])
        shape, layout, n = tuple(weight.shape), bank.layout, bank.a.shape[0]
        a_shape, b_shape = layout.factor_shapes(shape, bank.a.shape[-1]) if layout.fits(
            len(shape)
        ) else ((), ())  # fmt: skip
        if (tuple(bank.a.shape), tuple(bank.b.shape)) != ((n, *a_shape), (n, *b_shape)):
            raise AdapterMismatchError(
                f"{path}: bank factors a {bank.a.shape}, b {bank.b.shape} do not fit the weight "
                f"of shape {shape} (layout {layout}); was the bank made for another base?"
            )
        n_stack = layout.stack_ndim(shape)
        scale = jnp.broadcast_to(bank.scale, (*shape[:n_stack], n))
        a, b = jnp.moveaxis(bank.a, 0, n_stack), jnp.moveaxis(bank.b, 0, n_stack)
        node[name + SUFFIX] = BankFactors(a, b, scale, layout)
    return root


def apply(
    model: Any,
    params: Any,
    bank: AdapterBank | Any,
    ids: jax.Array,
    *args: Any,
    strategy: str = "gather",
    variables: Mapping[str, Any] | None = None,
    rngs: Any = None,
    mutable: Any = False,
    method: Any = None,
    **kwargs: Any,
) -> Any:
    """Runs a Linen model on a batch whose examples each use their own adapter from ``bank``.

    Every banked layer computes the base output once for the whole batch and adds, per example,
    ``scale[id] * (x a[id]) b[id]`` (the layer kind's equivalent for lookups, tied heads and
    einsums). Example ``e`` equals ``jlora.linen.lora(model, ...).apply`` with adapter
    ``ids[e]`` alone, to float32 round-off; ``jlora.serving.BASE`` examples get the base model.

    Args:
        model: the ``flax.linen`` module, or a ``jlora.linen.LoraModel`` (its ``layers=``
            declarations are used to find kinds).
        params: the frozen base params (no ``'params'`` wrapper).
        bank: an :class:`AdapterBank` (ids are then checked against its occupied slots when
            concrete), or its :attr:`~AdapterBank.factors` (what a jitted function takes).
        ids: ``(B,)`` int adapter ids, one per example (the inputs' leading axis); None when
            ``bank`` is factors already gathered per example (:func:`jlora.serving.gather`).
        *args: inputs, as for ``model.apply``.
        strategy: how dense terms are computed: ``"gather"`` (default), ``"segment"`` or
            ``"onehot"`` (see :func:`jlora.serving.dense_term`).
        variables: other collections, e.g. ``{'cache': ...}``.
        rngs: rng streams, as for ``model.apply``.
        mutable: collections to update, as for ``model.apply``.
        method: the method to run, as for ``model.apply``.
        **kwargs: keyword inputs, as for ``model.apply``.

    Returns:
        What ``model.apply`` returns.

    Raises:
        BankError: ``ids`` of the wrong shape or (eagerly) out of range or naming an empty slot.
        AdapterMismatchError: a bank made for another base, a banked layer kind that mixed
            batches do not support (nn.Conv, DenseGeneral with batch_dims, custom layers).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora, jlora.linen
        >>> from jlora.serving import AdapterBank, apply
        >>> model = nn.Dense(4)
        >>> x = jnp.ones((3, 6))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> lora = jlora.linen.lora(model, jlora.LoraConfig(targets="kernel", rank=2))
        >>> one = lora.init_adapters(jax.random.key(1), params, x)
        >>> bank = AdapterBank.build(params, {"one": one}, capacity=2)
        >>> apply(model, params, bank, bank.ids(["one", None, "one"]), x).shape
        (3, 4)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"jlora.serving.apply: strategy {strategy!r}; expected {STRATEGIES}")
    custom = ()
    if hasattr(model, "_custom") and hasattr(model, "config"):  # a jlora.linen.LoraModel
        model, custom = model.model, model._custom()
    ids = None if ids is None else jnp.asarray(ids)  # None: factors gathered per example
    if isinstance(bank, AdapterBank):
        if ids is None:
            raise BankError(
                "jlora.serving.apply: ids=None is for factors gathered per example "
                "(jlora.serving.gather(bank.factors, ids)); with an AdapterBank pass the ids"
            )
        check_ids(ids, ids.shape[0] if ids.ndim else -1, bank.capacity, "jlora.serving.apply")
        if not isinstance(ids, jax.core.Tracer):
            bank.check_ids(ids)
        bank = bank.factors
    variables = dict(variables or {})
    applier = MixedApplier(ids, strategy, custom)
    with nn.intercept_methods(applier):
        result = model.apply(
            {"params": inject(params, bank), **variables},
            *args,
            rngs=rngs,
            mutable=mutable,
            method=method,
            **kwargs,
        )
    for path, _ in leaves_with_paths(bank, is_leaf=lambda x: isinstance(x, BankFactors)):
        if path not in applier.used and path.rpartition("/")[0] in applier.owners:
            raise AdapterMismatchError(
                f"{path}: the module owning this weight ran, but not through a method mixed "
                "batches adapt; leave this path out of the bank"
            )
    return result
