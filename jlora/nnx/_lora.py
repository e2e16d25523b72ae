"""``jlora.nnx.lora``: plans each targeted weight (its kind, layout, stack shape and factor
sharding) and attaches the factors ``jlora.init`` makes for exactly those weights."""

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
from .._targets import check_patterns, exact_config
from ._adapted import attach, check_free, is_adapted
from ._convert import check_module, flat_variables, join, node
from ._custom_kind import custom_kind
from ._extras import mark
from ._kinds import SUPPORTED, kind_of
from ._sharding import factor_metadata

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
