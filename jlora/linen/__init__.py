"""LoRA for any ``flax.linen`` model, without editing its code.

:func:`lora` wraps a Linen module and a :class:`jlora.LoraConfig`. Its :meth:`LoraModel.apply` takes
the frozen ``params`` and the trainable adapters as separate arguments and returns what
``model.apply`` returns, with every targeted layer computing (Hu et al. 2022)

    h = x W0 + scale * (drop(x) a) b

in factored form (:mod:`jlora.ops`): ``W0 + delta`` is never built, so a train step costs the
frozen forward and backward plus ``O(r (fan_in + fan_out))`` per row. Adapted layer kinds:
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` (their ``kernel``) and ``nn.Embed``
(its ``embedding``, for lookups and for ``attend``, the tied output head).

Targets are regexes over the paths of ``params`` (``layers/attn/query/kernel``, no leading
``params/``), as for :func:`jlora.init`, so the adapters of :meth:`LoraModel.init_adapters` also
work with :func:`jlora.merge`. Weight layouts (which axes are stack, fan-in and fan-out) come from
the module kinds, found by running the model abstractly once; users never write them.

Lifted transforms: the factors travel in the ``params`` collection next to their weight, so
``nn.scan`` (stacked layers, ``variable_axes={'params': 0}``), ``nn.vmap`` and ``nn.remat`` hand
each layer its own slice, as they do the kernel. Other collections (``batch_stats``, ``cache``)
pass through ``variables=``, and ``mutable=`` returns their updates as Flax does.

LoRA dropout (``config.dropout``) acts on each adapter's input in train mode only, that is when
``apply(..., lora_train=True)``. It draws from the ``'dropout'`` rng stream (``rng_stream=`` of
:func:`lora` changes it) inside each adapted module's own scope, so the model's own dropout masks
are unchanged. Inside ``nn.scan`` / ``nn.vmap`` the stream must be listed in ``split_rngs``, as for
the model's own dropout. Embedding lookups take no dropout.

DoRA (Liu et al. 2024): ``apply(..., magnitudes=m)`` with ``m`` from
:func:`jlora.variants.dora_magnitudes` makes those ``nn.Dense`` / ``nn.DenseGeneral`` layers DoRA
layers (:mod:`jlora.linen._dora`); the adapters themselves are the same.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from .._config import LoraConfig
from .._custom import CustomLayer, check_layers
from .._errors import (
    AdapterMismatchError,
    MissingRngError,
    TargetError,
)
from .._factors import init
from .._layout import Layout
from .._merge import adapter_tables
from .._paths import leaves_with_paths
from .._summary import AdapterSummary, summary
from .._targets import check_patterns, exact_config
from ..variants._dora_layers import magnitude_table
from ._dora import add_magnitudes
from ._intercept import Applier, Trace, inject, join, strip, trace, unused_reason
from ._layers import LayerKind, custom_kind

__all__ = ["LoraModel", "lora"]


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A Linen model with LoRA adapters attached at the weights a config targets.

    Create it with :func:`lora`. It holds no arrays: the frozen ``params`` and the adapters are
    arguments of every call, so ``jax.grad`` with respect to the adapters alone differentiates
    nothing of the base.

    Attributes:
        model: the wrapped ``flax.linen`` module (unbound).
        config: which weights to adapt and how.
        rng_stream: the rng stream LoRA dropout draws from in train mode.
        layers: declared layer kinds, ``((module class, jlora.CustomLayer), ...)``.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora.linen
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
        >>> x = jnp.ones((2, 5))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> adapted = jlora.linen.lora(model, jlora.LoraConfig(targets=".*kernel", rank=2))
        >>> adapters = adapted.init_adapters(jax.random.key(1), params, x)
        >>> bool((adapted.apply(params, adapters, x) == model.apply({"params": params}, x)).all())
        True
    """

    model: nn.Module
    config: LoraConfig
    rng_stream: str = "dropout"
    layers: tuple[tuple[type, CustomLayer], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            model = self.model
            if isinstance(model, type) and issubclass(model, nn.Module):
                found = f"the class {model.__name__}"
                fix = f"pass an instance, e.g. {model.__name__}(...)"
            elif isinstance(getattr(model, "module", None), nn.Module):
                found = f"{type(model).__name__}, a wrapper holding a Linen module"
                fix = (
                    "pass its .module (for a Hugging Face Flax model: jlora.linen.lora(hf.module, "
                    "config), then adapted.apply(hf.params, adapters, ...))"
                )
            elif type(model).__module__.startswith("flax.nnx"):
                found = f"the flax.nnx object {type(model).__name__}"
                fix = "use jlora.nnx for flax.nnx models"
            else:
                found = type(model).__name__
                fix = (
                    "pass the nn.Module you call .init and .apply on, not its params or a function"
                )
            raise TypeError(f"jlora.linen.lora: expected a flax.linen Module, got {found}; {fix}")
        if not isinstance(self.config, LoraConfig):
            raise TypeError(
                f"jlora.linen.lora: expected a jlora.LoraConfig, got "
                f"{type(self.config).__name__}; build one with "
                "jlora.LoraConfig(targets=..., rank=...)"
            )
        if not isinstance(self.rng_stream, str):
            raise TypeError(f"jlora.linen.lora: rng_stream {self.rng_stream!r} is not a string")
        layers = self.layers
        layers = check_layers(
            "jlora.linen.lora", dict(layers) if isinstance(layers, tuple) else layers
        )
        object.__setattr__(self, "layers", tuple(layers.items()))

    def _trace(self, params, args, kwargs, variables, rngs, method) -> Trace:
        custom = tuple((cls, custom_kind(cls, layer)) for cls, layer in self.layers)
        variables = self._variables(variables)
        return trace(self.model, params, args, kwargs, variables, rngs, method, self.config, custom)

    def _custom(self) -> tuple[tuple[type, LayerKind], ...]:
        return tuple((cls, custom_kind(cls, layer)) for cls, layer in self.layers)

    def infer_layouts(
        self,
        params: Any,
        *args: Any,
        variables: Mapping[str, Any] | None = None,
        rngs: Any = None,
        method: Any = None,
        **kwargs: Any,
    ) -> dict[str, str]:
        """The layout string of every adaptable weight the example call uses.

        Runs ``model.apply`` abstractly (``jax.eval_shape``: no FLOPs) and reads each layer's
        layout from its kind and attributes, e.g. ``'sioo'`` for a DenseGeneral query kernel
        stacked by ``nn.scan``. The strings are those of :class:`jlora.Layout` and can go into
        ``LoraConfig.layouts`` to use :func:`jlora.init` directly.

        Args:
            params: the model's params (arrays or ``jax.ShapeDtypeStruct``).
            *args: example inputs, as for ``model.apply``.
            variables: other collections, e.g. ``{'batch_stats': ...}``.
            rngs: rng streams the example call needs (e.g. the model's own dropout).
            method: the method to run, as for ``model.apply``.
            **kwargs: keyword inputs, as for ``model.apply``.

        Returns:
            ``{param path: layout string}`` in params order.

        Example:
            >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora.linen
            >>> model = nn.DenseGeneral(features=(4, 8), axis=-1)
            >>> x = jnp.ones((2, 16))
            >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]  # shapes only
            >>> jlora.linen.lora(model, jlora.LoraConfig(targets="kernel")).infer_layouts(params, x)
            {'kernel': 'ioo'}
        """
        seen = self._trace(params, args, kwargs, variables, rngs, method).seen
        out = {}
        for path, leaf in leaves_with_paths(params):
            owner, _, name = path.rpartition("/")
            module = seen.get(owner)
            if (
                module is not None
                and module.kind is not None
                and name == module.kind.param
                and isinstance(module.layout, Layout)
            ):
                out[path] = module.layout.spec(len(leaf.shape))
        return out

    def init_adapters(
        self,
        key: jax.Array,
        params: Any,
        *args: Any,
        variables: Mapping[str, Any] | None = None,
        rngs: Any = None,
        method: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Creates adapters for the targeted weights, with layouts read from the model.

        Traces ``model.apply`` on the example inputs abstractly (see :meth:`infer_layouts`), then
        calls :func:`jlora.init` with those layouts; the result is the same sparse adapter pytree,
        so :func:`jlora.merge` accepts it. At init the adapted model equals the base exactly.

        Args:
            key: PRNG key for the factors.
            params: the model's params (arrays or ``jax.ShapeDtypeStruct``).
            *args: example inputs for ``model.apply`` (only shapes and dtypes are used).
            variables: other collections, e.g. ``{'batch_stats': ...}``.
            rngs: rng streams the example call needs.
            method: the method to run, as for ``model.apply``.
            **kwargs: keyword inputs, as for ``model.apply``.

        Returns:
            ``{...: LoraFactors}``, mirroring ``params`` at the targeted weights, plus a
            :class:`jlora.Trainable` copy of each leaf ``config.trainable`` selects (these leaves
            of ``params`` must be concrete arrays).

        Raises:
            TargetError: a target lands on a weight jlora cannot adapt (a module kind other than
                those supported, a bias, a grouped conv, ...), on a weight no module used in the
                example call, or matches no path.

        Example:
            >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora.linen
            >>> model = nn.Conv(features=6, kernel_size=(3, 3))
            >>> x = jnp.ones((1, 8, 8, 2))
            >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]  # shapes only
            >>> adapted = jlora.linen.lora(model, jlora.LoraConfig(targets="kernel", rank=2))
            >>> f = adapted.init_adapters(jax.random.key(1), params, x)["kernel"]
            >>> f.a.shape, f.b.shape
            ((3, 3, 2, 2), (2, 6))
        """
        run = self._trace(params, args, kwargs, variables, rngs, method)
        config, seen = self.config, run.seen
        leaves = leaves_with_paths(params)
        check_patterns([p for p, _ in leaves], config)
        chosen, layouts, skipped = [], [], {}
        for path, leaf in leaves:
            if not config.selects(path):
                continue
            owner = path.rpartition("/")[0]
            preset = config.by_preset_only(path)
            module = seen.get(owner)
            if preset and module is not None and module.kind is not None:
                # "all-linear": linear layers only, and never the output head.
                if not module.kind.linear or owner in run.heads:
                    continue
            reason = unused_reason(path, seen)
            if reason is None and module is None:
                reason = (
                    "no module used this weight when the model ran on the example inputs; pass "
                    "inputs (and method=) that run it, or exclude this path"
                )
            if reason is not None:
                if config.strict and not preset:
                    raise TargetError(f"{path}: {reason}")
                skipped[path] = reason
                continue
            chosen.append(path)
            layouts.append((re.escape(path), module.layout.spec(len(leaf.shape))))
        exact = exact_config(config, chosen, layouts, skipped, "jlora.linen")
        return init(key, params, exact)

    def summary(
        self,
        params: Any,
        adapters: Any,
        *args: Any,
        variables: Mapping[str, Any] | None = None,
        rngs: Any = None,
        method: Any = None,
        magnitudes: Any = None,
        **kwargs: Any,
    ) -> AdapterSummary:
        """A table of the adapted weights with their layer kinds (one abstract run of the model).

        Args:
            params: the base params.
            adapters: the adapters.
            *args: example inputs, as for :meth:`init_adapters`.
            variables: other collections.
            rngs: rng streams the example call needs.
            method: the method to run.
            magnitudes: DoRA's magnitudes ``{weight path: m}``, as for :meth:`apply`; each is
                trained, so it counts in its weight's row (as in :func:`jlora.count_params`).
            **kwargs: keyword inputs.

        Returns:
            A :class:`jlora.AdapterSummary`; ``print`` it.

        Raises:
            AdapterMismatchError: a magnitude has no factors at its path or does not fit them.

        Example:
            >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora.linen
            >>> model = nn.Dense(4)
            >>> x = jnp.ones((3, 6))
            >>> params = model.init(jax.random.key(0), x)["params"]
            >>> adapted = jlora.linen.lora(model, jlora.LoraConfig(targets="kernel", rank=2))
            >>> adapters = adapted.init_adapters(jax.random.key(1), params, x)
            >>> print(adapted.summary(params, adapters, x))
            path    kind      weight shape  rank  scale  params
            kernel  nn.Dense  (6, 4)           2      8      20
            trainable params: 20 of 28 in the base (71.43%)
            >>> from jlora.variants import dora_magnitudes
            >>> m = dora_magnitudes(params, adapters)
            >>> adapted.summary(params, adapters, x, magnitudes=m).trainable_params  # + 4 of m
            24
        """
        seen = self._trace(params, args, kwargs, variables, rngs, method).seen
        kinds = {
            join(owner, module.kind.param): module.kind_name
            for owner, module in seen.items()
            if module.kind is not None
        }
        return summary(adapters, params, kinds=kinds, magnitudes=magnitudes)

    def apply(
        self,
        params: Any,
        adapters: Any,
        *args: Any,
        variables: Mapping[str, Any] | None = None,
        rngs: Any = None,
        mutable: Any = False,
        method: Any = None,
        lora_train: bool = False,
        magnitudes: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Runs the model with its adapters: ``model.apply`` plus ``scale * (x a) b`` per layer.

        Args:
            params: the frozen base params (no ``'params'`` wrapper).
            adapters: adapters for these params (:meth:`init_adapters`, training, a checkpoint).
                Their trainable extras (:class:`jlora.Trainable`) replace the weights at their
                paths, so gradients with respect to ``adapters`` reach them.
            *args: inputs, as for ``model.apply``.
            variables: other collections, e.g. ``{'batch_stats': ...}`` or ``{'cache': ...}``.
            rngs: rng streams, as for ``model.apply``. LoRA dropout draws from
                ``rngs[rng_stream]`` (``'dropout'`` by default).
            mutable: collections to update, as for ``model.apply``.
            method: the method to run, as for ``model.apply``.
            lora_train: train mode for the adapters: apply LoRA dropout (``config.dropout``).
                Independent of any ``train``/``deterministic`` argument of the model itself,
                which goes in ``**kwargs``.
            magnitudes: DoRA (Liu et al. 2024): ``{weight path: m}`` from
                :func:`jlora.variants.dora_magnitudes`; each of these ``nn.Dense`` /
                ``nn.DenseGeneral`` layers computes ``(x W0 + scale (x a) b) m / ||W0 + scale a
                b||_c + bias`` (train ``m`` with the factors; merge with
                :func:`jlora.variants.dora_merge`). Other adapted layers stay plain LoRA.
            **kwargs: keyword inputs, as for ``model.apply``.

        Returns:
            What ``model.apply({'params': params, **variables}, ...)`` returns: the output, or
            ``(output, updated collections)`` with ``mutable``.

        Raises:
            AdapterMismatchError: an adapter's path is not in ``params``, its shapes do not fit
                the weight, its layout is not the module's, or it sits on a weight jlora cannot
                adapt; a magnitude has no factors, does not fit, or sits on another layer kind.
            MissingRngError: ``lora_train=True`` with ``config.dropout > 0`` and no rng stream.

        Example:
            >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora.linen
            >>> model = nn.Embed(num_embeddings=10, features=4)
            >>> ids = jnp.array([[1, 2, 3]])
            >>> params = model.init(jax.random.key(0), ids)["params"]
            >>> adapted = jlora.linen.lora(model, jlora.LoraConfig(targets="embedding", rank=2))
            >>> adapters = adapted.init_adapters(jax.random.key(1), params, ids)
            >>> adapted.apply(params, adapters, ids).shape
            (1, 3, 4)
            >>> adapted.apply(params, adapters, jnp.ones((1, 4)), method="attend").shape
            (1, 10)
        """
        variables = self._variables(variables)
        rate = self.config.dropout if lora_train else 0.0
        if rate > 0 and not (isinstance(rngs, Mapping) and self.rng_stream in rngs):
            raise MissingRngError(
                f"LoRA dropout is {rate} and lora_train=True, but rngs has no "
                f"{self.rng_stream!r} key; pass rngs={{{self.rng_stream!r}: key}} to apply, or "
                "lora_train=False to evaluate"
            )
        table, extras = adapter_tables(adapters)
        dora = magnitude_table(table, magnitudes)
        applier = Applier(rate, self.rng_stream, self.config, self._custom())
        with nn.intercept_methods(applier):
            result = self.model.apply(
                {"params": add_magnitudes(inject(params, table, extras), dora), **variables},
                *args,
                rngs=rngs,
                mutable=mutable,
                method=method,
                **kwargs,
            )
        for path in table:
            reason = None if path in applier.used else unused_reason(path, applier.seen)
            if reason is not None:
                raise AdapterMismatchError(f"{path}: adapters here cannot be applied: {reason}")
        if mutable is not False or kwargs.get("capture_intermediates"):
            out, state = result
            return out, strip(state)
        return result

    def _variables(self, variables: Mapping[str, Any] | None) -> dict[str, Any]:
        if variables is None:
            return {}
        if not isinstance(variables, Mapping) or "params" in variables:
            raise ValueError(
                "LoraModel: variables= takes the collections other than 'params' (e.g. "
                "{'batch_stats': ...}); pass the params as the first argument"
            )
        return dict(variables)


def lora(
    model: nn.Module,
    config: LoraConfig,
    *,
    rng_stream: str = "dropout",
    layers: Mapping[type, CustomLayer] | None = None,
) -> LoraModel:
    """Attaches LoRA to a ``flax.linen`` model at the weights ``config`` targets.

    Args:
        model: any Linen module (unbound, as passed to ``model.init``).
        config: which weights to adapt and how; layouts are read from the model, so
            ``config.layouts`` is only needed for weights of modules jlora does not know.
        rng_stream: the rng stream LoRA dropout draws from in train mode.
        layers: layer kinds jlora does not know, ``{module class: jlora.CustomLayer(...)}``:
            which parameter the layer multiplies its input by, and its layout (e.g. ``"oi"`` for
            Hugging Face GPT-2's ``FlaxConv1D``, whose kernel is stored ``(out, in)``).

    Returns:
        A :class:`LoraModel`; see its ``init_adapters`` and ``apply``. Adapted layers:
        ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed``.

    Raises:
        TypeError: ``model`` is not a Linen module (e.g. a class, a params dict, an NNX module),
            or ``config`` is not a :class:`jlora.LoraConfig`.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora.linen
        >>> model = nn.Dense(4)
        >>> x = jnp.ones((3, 6))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> adapted = jlora.linen.lora(model, jlora.LoraConfig(targets="kernel", rank=2))
        >>> adapters = adapted.init_adapters(jax.random.key(1), params, x)
        >>> adapters = jax.tree.map(jnp.ones_like, adapters)
        >>> merged = jlora.merge(params, adapters)
        >>> y = adapted.apply(params, adapters, x)
        >>> bool(jnp.allclose(y, model.apply({"params": merged}, x), atol=1e-5))
        True
    """
    return LoraModel(model, config, rng_stream=rng_stream, layers=tuple((layers or {}).items()))
