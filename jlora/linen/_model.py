"""``LoraModel``, the Linen wrapper: the model, its config, and ``apply`` with adapters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from .._config import LoraConfig
from .._custom import CustomLayer, check_layers
from .._errors import AdapterMismatchError, MissingRngError
from .._merge import adapter_tables
from ..variants._dora_layers import magnitude_table
from ._dora import add_magnitudes
from ._inject import inject, strip
from ._intercept import Applier
from ._layer_kind import LayerKind, custom_kind
from ._reading import ModelReading
from ._trace import unused_reason


@dataclasses.dataclass(frozen=True)
class LoraModel(ModelReading):
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

    def _custom(self) -> tuple[tuple[type, LayerKind], ...]:
        return tuple((cls, custom_kind(cls, layer)) for cls, layer in self.layers)

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
