"""The method interceptors behind :mod:`jlora.linen`, and how factors travel into a Linen model.

**Factors ride in the ``params`` collection.** For each adapted weight ``.../kernel`` the transform
puts its :class:`~jlora.LoraFactors` next to it under ``.../kernel@lora``. Flax's lifted transforms
(``nn.scan``, ``nn.vmap``, ``nn.remat``) slice, broadcast and checkpoint a collection as a whole, so
inside a scanned body a layer sees its own slice of its factors exactly as it sees its own slice of
its kernel (:mod:`jlora.linen._inject`). Factors reached by closure would instead be the whole
stack in every layer.

An interceptor (``nn.intercept_methods``) runs around every module method: for a supported layer
(:mod:`jlora.linen._layers`) it calls the unmodified method, reads ``<param>@lora`` from the
module's own scope and adds the factored term. A second interceptor only records module kinds and
layouts, for :meth:`jlora.linen.LoraModel.init_adapters`, while :func:`~jlora.linen._trace.trace`
runs the model abstractly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from .._config import LoraConfig
from .._errors import AdapterMismatchError, MissingRngError
from .._factors import LoraFactors
from .._layout import Layout
from ..quant._layers import linen_base
from ..variants._dora_layers import DORA_SUFFIX
from ._dora import dora_output
from ._layer_kind import LayerKind, Unsupported
from ._layers import add_term, kind_name, kind_of, owns_call

SUFFIX = "@lora"


def join(owner: str, name: str) -> str:
    """The parameter path of ``name`` in the module at ``owner`` (``''`` for the root)."""
    return f"{owner}/{name}" if owner else name


@dataclasses.dataclass
class Seen:
    """A module met while running the model: its kind and, if supported, its weight's layout."""

    kind_name: str
    kind: LayerKind | None
    layout: Layout | Unsupported | None = None


class Recorder:
    """Interceptor that records every module's kind and every supported layer's layout.

    A layout that ``config.layouts`` gives for a weight is used where the layer kind can take it
    (an einsum's roles), and must equal the module's own otherwise.
    """

    def __init__(
        self, config: LoraConfig | None = None, custom: tuple[tuple[type, LayerKind], ...] = ()
    ) -> None:
        self.seen: dict[str, Seen] = {}
        self.config = config
        self.custom = custom
        # id of a supported layer's output -> (its module path, the output, kept alive so that
        # its id is not reused while the trace runs)
        self.outputs: dict[int, tuple[str, Any]] = {}

    def _layout(self, kind: LayerKind, path: str, context, args, kwargs) -> Layout:
        module, method = context.module, context.method_name
        layout = kind.layout(module, method, args, kwargs)
        spec = None if self.config is None else self.config.layout_for(join(path, kind.param))
        if spec is None:
            return layout
        chosen = Layout.parse(spec)
        if kind.choose is not None:
            return kind.choose(module, method, args, kwargs, chosen)
        if chosen != layout:
            raise Unsupported(
                f"LoraConfig.layouts gives {spec!r} for this weight, but {kind.name} fixes its "
                f"layout ({layout!r}); only einsum kernels take a chosen layout. Remove the entry"
            )
        return layout

    def observe(self, context: nn.module.InterceptorContext, args: tuple, kwargs: dict) -> Seen:
        module = context.module
        path = "/".join(module.scope.path)
        kind = kind_of(module, self.custom)
        seen = self.seen.setdefault(path, Seen(kind_name(module), kind))
        if kind is not None and owns_call(kind, context):
            try:
                layout: Layout | Unsupported = self._layout(kind, path, context, args, kwargs)
            except Unsupported as e:
                layout = e
            if seen.layout is None or isinstance(layout, Unsupported):
                seen.layout = layout
            elif isinstance(seen.layout, Layout) and seen.layout != layout:
                seen.layout = Unsupported(
                    f"{kind.name} is called with two weight layouts ({seen.layout} and {layout}), "
                    "so one adapter cannot fit both calls"
                )
        return seen

    def __call__(self, next_fun, args, kwargs, context):
        seen = self.observe(context, args, kwargs)
        y = next_fun(*args, **kwargs)
        if seen.kind is not None and owns_call(seen.kind, context):
            self.outputs[id(y)] = ("/".join(context.module.scope.path), y)
        return y


class Applier(Recorder):
    """Interceptor that adds ``scale * (x a) b`` (or the layer kind's equivalent) to each output."""

    def __init__(
        self,
        rate: float,
        rng_stream: str,
        config: LoraConfig | None = None,
        custom: tuple[tuple[type, LayerKind], ...] = (),
    ) -> None:
        super().__init__(config, custom)
        self.rate = rate
        self.rng_stream = rng_stream
        self.used: set[str] = set()

    def __call__(self, next_fun, args, kwargs, context):
        seen = self.observe(context, args, kwargs)
        kind, method, module = seen.kind, context.method_name, context.module
        if kind is None or not owns_call(kind, context):
            return next_fun(*args, **kwargs)
        factors = module.get_variable("params", kind.param + SUFFIX)
        # A quantised kernel: the base product dequantises block by block (jlora.quant).
        y = linen_base(kind.name, module, args, kwargs)
        y = next_fun(*args, **kwargs) if y is None else y
        if factors is None:
            return y
        owner = "/".join(module.scope.path)
        path = join(owner, kind.param)
        layout = seen.layout
        if isinstance(layout, Unsupported):
            raise AdapterMismatchError(f"{path}: adapters here cannot be applied: {layout}")
        _check_layout(path, kind, factors, layout)
        rate = 0.0 if method in kind.undropped else self.rate
        rng = None
        if rate > 0:
            if not module.has_rng(self.rng_stream):
                raise MissingRngError(
                    f"{path}: LoRA dropout is {rate} (train mode) but the module at '{owner}' has "
                    f"no {self.rng_stream!r} rng stream. Inside nn.scan / nn.vmap, list it in "
                    f"split_rngs, e.g. split_rngs={{'params': True, {self.rng_stream!r}: True}}"
                )
            rng = module.make_rng(self.rng_stream)
        self.used.add(path)
        magnitude = module.get_variable("params", kind.param + DORA_SUFFIX)
        if magnitude is not None:  # a DoRA layer (jlora.linen._dora)
            return dora_output(
                kind, module, method, args, kwargs, y, factors, magnitude, rate, rng, path
            )
        return add_term(kind, module, method, args, kwargs, y, factors, rate, rng)


def _check_layout(path: str, kind: LayerKind, factors: LoraFactors, layout: Layout) -> None:
    if factors.layout != layout:
        ndim = factors.a.ndim - 1 + factors.layout.fan_out_ndim
        raise AdapterMismatchError(
            f"{path}: the adapter's layout is {factors.layout.spec(ndim)!r} but this "
            f"{kind.name} weight's is {layout.spec(ndim)!r}; the adapters "
            "were made with a wrong layout. Create them with the init_adapters of a LoraModel with "
            "this config, which reads layouts from the modules (and LoraConfig.layouts)"
        )
