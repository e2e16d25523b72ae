"""The methods of :class:`jlora.linen.LoraModel` that read the model in one abstract run.

:class:`ModelReading` (a base class of ``LoraModel``) holds :meth:`~ModelReading.infer_layouts`,
:meth:`~ModelReading.init_adapters` and :meth:`~ModelReading.summary`: each runs ``model.apply``
under ``jax.eval_shape`` and reads the layers it saw, so ``_model.py`` keeps the wrapper and
``apply``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

from .._errors import TargetError
from .._factors import init
from .._layout import Layout
from .._paths import leaves_with_paths
from .._summary import AdapterSummary, summary
from .._targets import check_patterns, exact_config
from ._intercept import join
from ._layer_kind import custom_kind
from ._trace import Trace, trace, unused_reason


class ModelReading:
    """The abstract-run methods of :class:`jlora.linen.LoraModel` (a base class of it)."""

    def _trace(self, params, args, kwargs, variables, rngs, method) -> Trace:
        custom = tuple((cls, custom_kind(cls, layer)) for cls, layer in self.layers)
        variables = self._variables(variables)
        return trace(self.model, params, args, kwargs, variables, rngs, method, self.config, custom)

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
