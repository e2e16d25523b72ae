"""The NNX layer kinds jlora adapts: each one's weight, its layout, and its factored LoRA term.

A kind knows, from the module's own attributes, which axes of its weight are fan-in and fan-out
(so users never write a layout), and computes the adapter's term of the layer output through
:mod:`jlora.ops`:

* ``nnx.Linear``: kernel ``(in, out)``, layout ``"io"``.
* ``nnx.LinearGeneral``: kernel ``(*in_features, *out_features)``; the input's ``axis`` axes are
  moved last (in sorted order, the order ``dot_general`` contracts them in).
* ``nnx.Einsum``: each kernel letter is *shared* (in the input and the output: a stack axis ``s``
  with one adapter per index, e.g. per head), *contracted* (input only: fan-in) or *produced*
  (output only: fan-out), in any order (:mod:`jlora._einsum`); ``LoraConfig.layouts`` may fold
  shared letters into fan-in or fan-out, or make any letter a stack axis.
* ``nnx.Conv``: kernel ``(*window, c_in, c_out)``, layout ``"i" * (window + 1) + "o"``.
* ``nnx.Embed``: table ``(vocab, features)``, layout ``"vo"``; both the lookup and ``attend``.

Leading weight axes beyond the layer's own (``nnx.vmap``-created stacks of layers) are stack axes:
``nnx.scan`` slices them off the kernel and the factors alike, so each step sees its own slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _einsum, ops
from .._errors import AdapterMismatchError, TargetError
from .._factors import LoraFactors
from .._layout import Layout

SUPPORTED = (
    "nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed (and their subclasses), and "
    "layers declared with layers={cls: jlora.CustomLayer(...)}"
)

Term = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Kind:
    """One adaptable layer kind.

    Attributes:
        name: the kind as users write it (``"nnx.Linear"``).
        weight: the attribute holding the adapted weight.
        spec: ``(module, path) -> layout string`` of one layer's weight (no stack axes); raises
            :class:`TargetError` for configurations jlora cannot adapt.
        terms: ``((method, term), ...)``: each method whose output gets a term, and the term
            ``(module, x, y_dtype, factors, rate, rng, *args, **kwargs) -> array``, given the
            method's input and call arguments; added to the method's output.
        choose: ``(module, path, chosen) -> layout string`` when ``LoraConfig.layouts`` gives a
            layout for the weight (raises :class:`TargetError` if it does not fit); None for
            kinds whose layout is fixed by the module.
        cls: the class whose own methods the term is added to: a subclass's override that calls
            ``super().__call__`` gets the term inside that call, where it equals the merged layer.
        linear: whether the layer is a linear (Dense-like) layer, for the ``"all-linear"`` preset.
    """

    name: str
    weight: str
    spec: Callable[[Any, str], str]
    terms: tuple[tuple[str, Term], ...]
    choose: Callable[[Any, str, Layout], str] | None = None
    cls: type | None = None
    linear: bool = True

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods whose output gets the term."""
        return tuple(m for m, _ in self.terms)


def _floating(x: jax.Array, dtype: Any) -> jax.Array:
    # The base layer promotes its input to its output dtype; the LoRA term follows it so the two
    # add without mixing dtypes. Integer inputs too: left as they are, the factors would be cast
    # to the integers' dtype and the term truncated to nothing (jlora.linen casts the same way).
    return jnp.asarray(x).astype(dtype) if x.dtype != dtype else x


def _linear_term(module, x, dtype, f, rate, rng, *args, **kwargs):
    return ops.dense_branch(_floating(x, dtype), f, dropout_rate=rate, rng=rng)


def _linear_general_spec(module: nnx.LinearGeneral, path: str) -> str:
    if module.batch_axis:
        raise TargetError(
            f"{path}: nnx.LinearGeneral with batch_axis={dict(module.batch_axis)} is not supported "
            "(its kernel axes are indexed by the input's batch axes); exclude this path"
        )
    return "i" * len(module.in_features) + "o" * len(module.out_features)


def _linear_general_term(module, x, dtype, f, rate, rng, *args, **kwargs):
    axes = sorted(a % x.ndim for a in module.axis)
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    return ops.dense_branch(_floating(x, dtype), f, dropout_rate=rate, rng=rng)


def _equation(equation: str, path: str) -> _einsum.Equation:
    try:
        return _einsum.parse(equation)
    except _einsum.EinsumUnsupported as e:
        raise TargetError(f"{path}: nnx.Einsum cannot be adapted: {e}. Exclude this path") from None


def _einsum_spec(module: nnx.Einsum, path: str) -> str:
    return _equation(module.einsum_str, path).roles


def _einsum_choose(module: nnx.Einsum, path: str, chosen: Layout) -> str:
    eq = _equation(module.einsum_str, path)
    try:
        return _einsum.layout_for(eq, chosen).roles(len(eq.kernel))
    except _einsum.EinsumUnsupported as e:
        raise TargetError(f"{path}: {e}") from None


def _einsum_term(module, x, dtype, f, rate, rng, *args, **kwargs):
    equation = (args[0] if args else kwargs.get("einsum_str")) or module.einsum_str
    path = getattr(module, "lora_path", "nnx.Einsum")
    eq = _equation(equation, path)
    roles = f.layout.roles(len(eq.kernel))
    if len(roles) != len(eq.kernel) or f.a.ndim != len(roles) - roles.count("o") + 1:
        raise AdapterMismatchError(
            f"{path}: einsum {equation!r} does not fit the adapter (factors a {f.a.shape}, layout "
            f"{f.layout}); call the layer with the equation it was adapted with, one layer at a "
            "time (nnx.scan slices stacked factors)"
        )
    x = ops.dropout(_floating(x, dtype), rate, rng)
    return _einsum.term(eq, f.layout, x, f.a, f.b, f.scale)


def _conv_spec(module: nnx.Conv, path: str) -> str:
    if module.feature_group_count != 1:
        raise TargetError(
            f"{path}: nnx.Conv with feature_group_count={module.feature_group_count} is not "
            "supported (a grouped kernel is block-diagonal, a low-rank update is not); exclude "
            "this path"
        )
    if module.mask is not None:
        raise TargetError(
            f"{path}: nnx.Conv with a kernel mask is not supported (the mask would have to apply "
            "to a @ b as well); exclude this path"
        )
    return "i" * (len(module.kernel_size) + 1) + "o"


def _per_axis(value: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    return (value,) * n if isinstance(value, int) else tuple(value)


def _conv_term(module, x, dtype, f, rate, rng, *args, **kwargs):
    n = len(module.kernel_size)
    dilation = _per_axis(module.kernel_dilation, n)
    x = ops.dropout(_floating(x, dtype), rate, rng)
    padding = module.padding
    lead = [(0, 0)] * (x.ndim - n - 1)
    if isinstance(padding, str) and padding in ("CIRCULAR", "REFLECT"):
        # As nnx.Conv does: pad the input periodically (or by reflection), then convolve VALID.
        span = [(k - 1) * d + 1 for k, d in zip(module.kernel_size, dilation, strict=True)]
        pads = [*lead, *[((s - 1) // 2, s // 2) for s in span], (0, 0)]
        x = jnp.pad(x, pads, mode="wrap" if padding == "CIRCULAR" else "reflect")
        padding = "VALID"
    elif isinstance(padding, str) and padding == "CAUSAL":
        pads = [*lead, (dilation[0] * (module.kernel_size[0] - 1), 0), (0, 0)]
        x = jnp.pad(x, pads)
        padding = "VALID"
    elif isinstance(padding, int):
        padding = [(padding, padding)] * n
    elif not isinstance(padding, str):
        padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    return ops.conv_branch(
        x,
        f,
        strides=_per_axis(module.strides, n),
        padding=padding,
        input_dilation=_per_axis(module.input_dilation, n),
        kernel_dilation=dilation,
    )


def _embed_lookup_term(module, ids, dtype, f, rate, rng, *args, **kwargs):
    if module.num_embeddings == 1:  # nnx.Embed broadcasts its single row whatever the ids
        ids = jnp.zeros_like(ids)
    return ops.lookup_branch(ids, f).astype(dtype)


def _embed_attend_term(module, query, dtype, f, rate, rng, *args, **kwargs):
    return ops.attend_branch(_floating(query, dtype), f)


def _fixed(spec: str) -> Callable[[Any, str], str]:
    return lambda module, path: spec


def _kind(cls: type, name: str, weight: str, spec, terms, choose=None, linear=True):
    return cls, Kind(name, weight, spec, terms, choose, cls, linear)


# Order matters only for subclasses of several kinds; none of Flax's are.
KINDS: tuple[tuple[type, Kind], ...] = (
    _kind(nnx.Linear, "nnx.Linear", "kernel", _fixed("io"), (("__call__", _linear_term),)),
    _kind(
        nnx.LinearGeneral,
        "nnx.LinearGeneral",
        "kernel",
        _linear_general_spec,
        (("__call__", _linear_general_term),),
    ),
    _kind(
        nnx.Einsum,
        "nnx.Einsum",
        "kernel",
        _einsum_spec,
        (("__call__", _einsum_term),),
        _einsum_choose,
    ),
    _kind(nnx.Conv, "nnx.Conv", "kernel", _conv_spec, (("__call__", _conv_term),), linear=False),
    _kind(
        nnx.Embed,
        "nnx.Embed",
        "embedding",
        _fixed("vo"),
        (("__call__", _embed_lookup_term), ("attend", _embed_attend_term)),
        linear=False,
    ),
)


def kind_of(module: Any, custom: tuple[tuple[type, Kind], ...] = ()) -> Kind | None:
    """The kind of ``module`` (subclasses included), or None if jlora cannot adapt it.

    Declared layers (``custom``) come first, so a declaration overrides a built-in kind.
    """
    if is_adapted_class(type(module)):
        return type(module).__dict__["_jlora_kind"]
    for cls, kind in (*custom, *KINDS):
        if isinstance(module, cls):
            return kind
    return None


def is_adapted_class(cls: type) -> bool:
    """Whether ``cls`` is a jlora adapted subclass (which overrides ``__call__`` itself)."""
    return cls.__dict__.get("_jlora_base") is not None


def factors_of(module: Any) -> LoraFactors:
    """The adapted module's factors as :class:`jlora.LoraFactors` (static data from metadata)."""
    meta = module.lora_a.get_metadata()
    return LoraFactors(
        module.lora_a[...], module.lora_b[...], meta["lora_scale"], meta["lora_layout"]
    )
