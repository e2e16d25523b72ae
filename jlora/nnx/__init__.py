"""LoRA for Flax NNX models: adapt any ``nnx.Module`` in place, train the factors, merge them away.

:func:`lora` gives every targeted ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``
and ``nnx.Embed`` (lookup and ``attend``) a pair of factors held in :class:`LoraParam` variables,
and the layer computes ``h = x W0 + scale * (drop(x) a) b`` in factored form (Hu et al. 2022)
through :mod:`jlora.ops`, never forming ``W0 + delta``. The base weights keep their paths, so
``nnx.state(model, nnx.Param)`` is the functional parameter tree and targets are the same
``/``-joined paths (``blocks/0/attn/query/kernel``) the functional core matches. Layouts come from
the module kinds.

:class:`LoraParam` is not an ``nnx.Param``: ``nnx.Optimizer(model, tx, wrt=LoraParam)`` trains the
factors only, ``nnx.split(model, LoraParam, ...)`` isolates them, and ``nnx.Param`` filters see
the frozen base only. :func:`to_adapters` and :func:`to_state` convert between the factors' state
and the functional adapter pytree of :func:`jlora.init`; :func:`merge` returns a plain model.

Trainable extras (``LoraConfig.trainable``: a classifier head, a resized embedding) are the model's
own ``nnx.Param`` s, trained in place: :func:`lora` marks them (metadata ``lora_trainable=True``;
they stay ``nnx.Param``), and :data:`TRAINABLE` selects factors and extras, for
``nnx.Optimizer(model, tx, wrt=jlora.nnx.TRAINABLE)``. They appear as :class:`jlora.Trainable` in
:func:`to_adapters`.

DoRA layers: :func:`jlora.variants.dora_nnx` gives adapted ``nnx.Linear`` / ``nnx.LinearGeneral``
layers a ``lora_magnitude`` :class:`LoraParam` (:mod:`jlora.nnx._dora`); :func:`merge` folds it.

LoRA dropout follows ``nnx.Dropout``: an adapted layer starts in train mode
(``deterministic=False``) and draws its masks from an ``nnx.RngStream`` forked at adaptation from
the ``dropout`` stream of ``rngs`` (``default`` if there is none); ``model.eval()``,
``model.train()`` and ``nnx.view(model, deterministic=...)`` switch it. Embedding adapters have no
dropout.

Sharding follows Flax's conventions: a weight with sharding metadata (``nnx.with_partitioning``,
``kernel_metadata={'out_sharding': ...}``) gives its factors derived names (``a``: its stack and
fan-in names plus the rank axis :data:`jlora.sharding.RANK_AXIS`, replicated; ``b``: the rank axis
plus its stack and fan-out names), and under a mesh (``jax.set_mesh``, Auto or Explicit axes) they
are created sharded, as Flax creates the layer's own variables; ``nnx.get_partition_spec``,
``nnx.Optimizer`` and :func:`merge` keep them so (:mod:`jlora.nnx._sharding`).

Stacked layers (built with ``nnx.vmap``, run with ``nnx.scan`` or ``nnx.vmap``) get stacked factors
``a: (L, *fan_in, r)``, ``b: (L, r, *fan_out)`` and, with dropout, one rng stream per layer. A scan
over the module (``in_axes=0``, the usual form) slices every variable of it, so each step sees its
own layer's factors beside its kernel. A scan given ``nnx.StateAxes`` must slice
:class:`LoraParam` (and, with dropout, ``nnx.RngState``) along with ``nnx.Param``; otherwise the
factored product sees the whole stack and raises :class:`jlora.AdapterMismatchError`.

Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jlora, jlora.nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> x = jnp.ones((3, 4))
    >>> y0 = model(x)
    >>> _ = jlora.nnx.lora(model, jlora.LoraConfig(targets=r".*kernel", rank=2), rngs=nnx.Rngs(2))
    >>> bool((model(x) == y0).all())  # b = 0: the adapted model equals the base at init
    True
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, jlora.nnx.LoraParam)))
    {'layers': {0: {'lora_a': (4, 2), 'lora_b': (2, 8)}, 1: {'lora_a': (8, 2), 'lora_b': (2, 2)}}}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
from flax import nnx

from .._config import LoraConfig
from .._custom import CustomLayer, check_layers
from .._errors import MissingRngError, TargetError
from .._extras import check_trainable_paths
from .._factors import init
from .._layout import Layout
from .._merge import factors_by_path
from .._paths import nest
from .._summary import AdapterSummary
from .._summary import summary as summarise
from .._targets import check_patterns, exact_config
from ._adapted import LoraParam, attach, check_free, is_adapted
from ._convert import (
    adapted,
    check_module,
    flat_variables,
    join,
    merge,
    node,
    set_adapters,
    to_adapters,
    to_state,
)
from ._extras import TRAINABLE, mark
from ._kinds import SUPPORTED, custom_kind, kind_of
from ._sharding import factor_metadata

__all__ = [
    "TRAINABLE",
    "LoraParam",
    "lora",
    "merge",
    "set_adapters",
    "summary",
    "to_adapters",
    "to_state",
]

M = TypeVar("M", bound=nnx.Module)
Parts = tuple[Any, ...]


def _where(parts: Parts) -> str:
    """A module's path for messages; the model itself is ``(root)``."""
    return join(parts) or "(root)"


def _unsupported(path: str, parts: Parts, model: Any, custom: tuple) -> TargetError:
    owner = parts[:-1]
    while owner and not isinstance(node(model, owner), nnx.Module):
        owner = owner[:-1]
    module = node(model, owner)
    kind = kind_of(module, custom)
    what = (
        f"the {parts[-1]!r} of {kind.name} '{_where(owner)}' (only its {kind.weight!r} can be "
        "adapted)"
        if kind is not None
        else f"a weight of module '{_where(owner)}' of kind {type(module).__qualname__}"
    )
    return TargetError(
        f"{path}: the targets select {what}; jlora.nnx adapts the weights of {SUPPORTED}. "
        "Narrow LoraConfig.targets (e.g. to '.*kernel') or add this path to exclude"
    )


def _as_rngs(rngs: Any) -> nnx.Rngs:
    if isinstance(rngs, nnx.Rngs):
        return rngs
    if isinstance(rngs, int) or isinstance(rngs, jax.Array):
        return nnx.Rngs(rngs)
    raise TypeError(
        f"jlora.nnx.lora: rngs must be an nnx.Rngs, an int seed or a PRNG key, got "
        f"{type(rngs).__name__}"
    )


def _dropout_stream(rngs: nnx.Rngs, stack: tuple[int, ...]) -> Any:
    if "dropout" not in rngs and "default" not in rngs:
        return None
    key = rngs["dropout"]()
    # One independent stream per stacked layer (key shape = stack shape), so nnx.scan hands each
    # layer its own slice of the stream, as it does the kernel and the factors.
    return nnx.Rngs(dropout=jax.random.split(key, stack) if stack else key)["dropout"]


def _spec(kind: Any, module: Any, path: str, where: str, config: LoraConfig) -> str:
    """The layer's own layout string: the kind's, or the one ``config.layouts`` chooses."""
    spec = kind.spec(module, where)
    given = config.layout_for(path)
    if given is None:
        return spec
    chosen = Layout.parse(given)
    if kind.choose is not None:
        return kind.choose(module, where, chosen)
    if chosen != Layout.parse(spec):
        raise TargetError(
            f"{path}: LoraConfig.layouts gives {given!r}, but {kind.name} fixes its layout "
            f"({spec!r}); only einsum kernels take a chosen layout. Remove the entry"
        )
    return spec


def _extras(flat: list[tuple[Parts, Any]], config: LoraConfig, adapted: set[str]) -> list[Any]:
    """The Params ``config.trainable`` selects, validated (see :func:`jlora.init`)."""
    if not config.trainable:
        return []
    paths = [join(parts) for parts, _ in flat]
    selected = set(check_trainable_paths(paths, config, adapted))
    out = []
    for parts, var in flat:
        path = join(parts)
        if path in selected:
            if not jax.numpy.issubdtype(var.dtype, jax.numpy.floating):
                raise TargetError(
                    f"{path}: trainable selects a Param of dtype {var.dtype}, which cannot take "
                    "gradients; expected a floating-point weight. Narrow LoraConfig.trainable"
                )
            out.append(var)
    return out


HEAD_NAMES = ("lm_head", "head", "classifier", "logits", "unembed", "score")


def _is_head(parts: Parts) -> bool:
    # NNX adapts without running the model, so the output head is known by its name only.
    return len(parts) >= 2 and str(parts[-2]) in HEAD_NAMES


def _plan(model: Any, parts: Parts, var: Any, module: Any, kind: Any, custom: tuple, config):
    """``((owner, module, kind, stack shape, factor sharding metadata), layout string)`` for one
    targeted weight."""
    path = join(parts)
    if kind is None or parts[-1] != kind.weight:
        raise _unsupported(path, parts, model, custom)
    if is_adapted(module):
        raise TargetError(
            f"{path}: this layer already has LoRA factors; merge them first "
            "(jlora.nnx.merge) or load other adapters with jlora.nnx.set_adapters"
        )
    check_free(module, _where(parts[:-1]))
    spec = _spec(kind, module, path, _where(parts[:-1]), config)
    n_stack = len(var.shape) - len(spec)
    if n_stack < 0:
        raise TargetError(
            f"{path}: {kind.name} weight of shape {var.shape} has fewer axes than its "
            f"layout {spec!r}; is the module's configuration consistent with its weight?"
        )
    layout = "s" * n_stack + spec
    sharding = factor_metadata(var, Layout.parse(layout), path)
    return (parts[:-1], module, kind, tuple(var.shape[:n_stack]), sharding), layout


def lora(
    model: M,
    config: LoraConfig,
    *,
    rngs: nnx.Rngs | jax.Array | int,
    copy: bool = False,
    layers: Mapping[type, CustomLayer] | None = None,
) -> M:
    """Adds LoRA factors to the layers of ``model`` that ``config`` targets.

    Targets are regexes over the ``/``-joined paths of ``nnx.state(model, nnx.Param)``
    (``blocks/0/attn/query/kernel``); each must select the weight of an ``nnx.Linear``,
    ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv`` or ``nnx.Embed``. Layouts are inferred
    from the layers, and the factors are exactly ``jlora.init(key, params, config)`` for those
    params and layouts (``key = rngs.params()``), so the adapted model equals the base at init.
    The Params ``config.trainable`` selects are marked as trainable extras (trained in place;
    train with ``wrt=jlora.nnx.TRAINABLE``).

    Args:
        model: any ``nnx.Module``.
        config: which weights to adapt and how (``config.layouts`` is only needed for weights the
            layer kind cannot describe; inferred layouts take precedence).
        rngs: ``nnx.Rngs`` (its ``params`` stream initialises the factors; its ``dropout`` stream,
            if any, is forked into each layer for LoRA dropout), an int seed or a PRNG key.
        copy: adapt a copy (``nnx.clone``) and leave ``model`` untouched; by default ``model``
            itself is adapted (and returned).
        layers: layer kinds jlora does not know, ``{module class: jlora.CustomLayer(...)}``:
            the attribute holding the weight the layer multiplies its input by, and its layout.

    Returns:
        The adapted model (``model`` itself unless ``copy``).

    Raises:
        TypeError: ``model`` is not an ``nnx.Module``.
        TargetError: a target selects a weight of another kind of module (or a bias), a layer
            configuration jlora cannot adapt, an already adapted layer, or nothing at all; a
            ``trainable`` pattern matches no Param, or selects a targeted or non-float one.
        MissingRngError: ``rngs`` has neither a ``params`` nor a ``default`` stream.

    Example:
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> layer = nnx.LinearGeneral(16, (4, 8), rngs=nnx.Rngs(0))
        >>> layer = jlora.nnx.lora(layer, jlora.LoraConfig(targets="kernel", rank=2), rngs=1)
        >>> layer.lora_a.shape, layer.lora_b.shape
        ((16, 2), (2, 4, 8))
    """
    check_module(model, "lora")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"jlora.nnx.lora: config must be a jlora.LoraConfig, got {config!r}")
    custom = tuple(
        (cls, custom_kind(cls, layer))
        for cls, layer in check_layers("jlora.nnx.lora", layers).items()
    )
    rngs = _as_rngs(rngs)
    if "params" not in rngs and "default" not in rngs:
        raise MissingRngError(
            "jlora.nnx.lora: rngs has no 'params' (or 'default') stream to initialise the "
            "factors; pass e.g. rngs=nnx.Rngs(params=0, dropout=1) or an int seed"
        )
    if copy:
        model = nnx.clone(model)
    flat = flat_variables(nnx.state(model, nnx.Param))
    check_patterns([join(parts) for parts, _ in flat], config)
    plan, layouts, skipped = {}, [], {}
    for parts, var in flat:
        path = join(parts)
        if not config.selects(path):
            continue
        module = node(model, parts[:-1])
        kind = kind_of(module, custom)
        preset = config.by_preset_only(path)
        if preset and kind is not None and (not kind.linear or _is_head(parts)):
            continue  # "all-linear": linear layers only, and never the output head
        try:
            plan[path], layout = _plan(model, parts, var, module, kind, custom, config)
        except TargetError as e:
            if config.strict and not preset:
                raise
            skipped[path] = str(e)
            continue
        layouts.append((re.escape(path), layout))
    extras = _extras(flat, config, set(plan))
    # Exactly the weights planned here. The extras are the model's own Params, trained in place:
    # init copies none.
    config = exact_config(config, list(plan), layouts, skipped, "jlora.nnx", trainable=())
    params = nest({join(parts): jax.ShapeDtypeStruct(var.shape, var.dtype) for parts, var in flat})
    adapters = factors_by_path(init(rngs.params(), params, config))
    for path, factors in adapters.items():
        owner, module, kind, stack, sharding = plan[path]
        stream = _dropout_stream(rngs, stack) if config.dropout > 0 else None
        attach(module, _where(owner), kind, factors, config.dropout, stream, sharding)
    for var in extras:
        mark(var)
    return model


def summary(model: nnx.Module) -> AdapterSummary:
    """A table of the adapted layers of ``model``: path, layer kind, weight shape, rank, scale and
    trainable parameters, and their share of the model's ``nnx.Param`` parameters. A DoRA
    layer's (:func:`jlora.variants.dora_nnx`) count includes its magnitude.

    Args:
        model: an adapted model.

    Returns:
        A :class:`jlora.AdapterSummary`; ``print`` it.

    Example:
        >>> from flax import nnx
        >>> import jlora, jlora.nnx
        >>> model = jlora.nnx.lora(
        ...     nnx.Linear(6, 4, rngs=nnx.Rngs(0)), jlora.LoraConfig(targets="kernel", rank=2), rngs=0
        ... )
        >>> print(jlora.nnx.summary(model))
        path    kind        weight shape  rank  scale  params
        kernel  nnx.Linear  (6, 4)           2      8      20
        trainable params: 20 of 28 in the base (71.43%)
    """
    check_module(model, "summary")
    kinds = {
        path: type(module).__dict__["_jlora_kind"].name
        for path, (_, module) in adapted(model).items()
    }
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    from ..variants import nnx_magnitudes  # DoRA's (jlora.variants.dora_nnx): trained too

    return summarise(to_adapters(model), base, kinds=kinds, magnitudes=nnx_magnitudes(model))
