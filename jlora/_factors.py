"""The adapter pytree: `LoraFactors` at each targeted weight, created by `init`.

For a frozen weight ``W0`` of shape ``(*stack, *fan_in, *fan_out)`` the adapter holds

    a: (*stack, *fan_in, r)      b: (*stack, r, *fan_out)      delta = scale * a @ b

and the adapted layer computes ``h = x W0 + scale * (x a) b`` (Hu et al. 2022, with the kernels in
Flax's ``(fan_in, fan_out)`` order, so the paper's ``B A x`` reads ``x a b`` here). Only ``a`` and
``b`` are pytree leaves; ``scale`` and the layout are static metadata, so ``jax.grad`` and optax see
the factors alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import prng_key
from ._config import LoraConfig
from ._errors import AdapterMismatchError, ConfigError
from ._extras import copy_extras, select_extras
from ._layout import Layout
from ._paths import is_box, nest, path_to_str, unbox
from ._targets import Target, select


@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """One weight's adapter: factors ``a``, ``b`` (leaves) and a static ``scale`` and ``layout``.

    Attributes:
        a: ``(*stack, *fan_in, rank)``.
        b: ``(*stack, rank, *fan_out)``.
        scale: ``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA).
        layout: the weight's fan-in/fan-out structure.

    Example:
        >>> import jax.numpy as jnp
        >>> f = LoraFactors(jnp.ones((3, 2)), jnp.zeros((2, 5)), scale=0.5, layout=Layout(1, 1))
        >>> f.rank, jax.tree_util.tree_leaves(f)[0].shape
        (2, (3, 2))
    """

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})
    layout: Layout = dataclasses.field(metadata={"static": True})

    def __post_init__(self) -> None:
        scale = self.scale
        real = not isinstance(scale, (bool, np.bool_)) and isinstance(
            scale, (int, float, np.integer, np.floating)
        )
        if not (real and math.isfinite(scale)):
            raise ConfigError(
                f"LoraFactors: scale {scale!r} is not a finite real number; expected alpha / rank "
                "(e.g. LoraConfig.scale_for(path)). A NaN, infinite or complex scale would put "
                "NaN/Inf (or a silently truncated value) into every merged weight"
            )
        if not isinstance(self.layout, Layout):
            raise ConfigError(
                f"LoraFactors: layout {self.layout!r} is not a jlora.Layout; expected the layout "
                "of the weight, e.g. jlora.Layout(1, 1) for a (fan_in, fan_out) kernel"
            )

    @property
    def rank(self) -> int:
        """The adapter's rank ``r`` (the last axis of ``a``)."""
        return self.a.shape[-1]


jax.tree_util.register_dataclass(
    LoraFactors, data_fields=["a", "b"], meta_fields=["scale", "layout"]
)


def _path_key(key: jax.Array, path: str) -> jax.Array:
    # One key per path, independent of which other paths are targeted.
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _draw_pair(
    key: jax.Array,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    fan_in: int,
    embedding: bool,
    scheme: str,
    dtype: str,
) -> tuple[jax.Array, jax.Array]:
    if embedding:
        # A lookup reads few rows of `a`, so `a = 0` and `b` random keeps init the identity while
        # every row still gets a gradient through `b`.
        if scheme == "gaussian":
            b = jax.random.normal(key, b_shape, dtype)
        else:
            bound = 1.0 / math.sqrt(a_shape[-1])
            b = jax.random.uniform(key, b_shape, dtype, -bound, bound)
        return jnp.zeros(a_shape, dtype), b
    bound = 1.0 / math.sqrt(fan_in)
    if scheme == "gaussian":
        a = bound * jax.random.normal(key, a_shape, dtype)
    else:
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return a, jnp.zeros(b_shape, dtype)


_STATIC = (1, 2, 3, 4, 5, 6)
# One small compiled draw per distinct factor shape: a transformer's many layers share a handful.
# (One jitted draw of every factor at once compiles in time that grows with the model.)
_draw_pair_jit = jax.jit(_draw_pair, static_argnums=_STATIC)


def draw(
    key: jax.Array,
    targets: Sequence[Target],
    config: LoraConfig,
    shardings: Mapping[str, tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """Initial factors for validated targets, optionally straight onto ``{path: (a, b)}`` shardings.

    The same jitted draw runs with or without shardings, so sharded and unsharded init are
    bit-identical.
    """
    out = {}
    for t in targets:
        a_shape, b_shape = t.layout.factor_shapes(t.shape, t.rank)
        _, fan_in, _ = t.layout.split(t.shape)
        static = (
            a_shape,
            b_shape,
            math.prod(fan_in),
            t.layout.embedding,
            config.init,
            config.dtype,
        )
        if shardings is None:
            fn = _draw_pair_jit
        else:
            fn = jax.jit(_draw_pair, static_argnums=_STATIC, out_shardings=shardings[t.path])
        a, b = fn(_path_key(key, t.path), *static)
        out[t.path] = LoraFactors(a, b, t.scale, t.layout)
    return nest(out)


RANK_AXIS = "lora_rank"  # the logical name of the rank axis of factors derived from boxed weights


def _boxes(params: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)
    return {path_to_str(p): x for p, x in flat if is_box(x)}


def box_like(f: LoraFactors, box: Any, path: str = "") -> LoraFactors:
    """``f`` with each factor boxed like the weight's ``box``, axis names derived by role.

    ``a`` gets the weight's stack and fan-in names plus the rank axis, ``b`` the rank axis plus
    the stack and fan-out names. The rank axis is :data:`RANK_AXIS` for logical names
    (``nn.LogicallyPartitioned``: map it in ``logical_axis_rules``; unmapped it is replicated)
    and ``None`` for mesh-axis names (``nn.Partitioned``). Fewer names than axes leave the trailing
    axes unnamed (replicated), as a short PartitionSpec does.

    Raises:
        AdapterMismatchError: the box has more names than the weight has axes.
    """
    names = getattr(box, "names", None)
    if names is None or not hasattr(box, "replace"):
        return f
    shape = tuple(unbox(box).shape)
    names = tuple(names)
    if len(names) > len(shape):
        kind = "logical axis" if hasattr(box, "rules") else "mesh-axis"
        raise AdapterMismatchError(
            f"{path}: the weight is boxed ({type(box).__name__}) with {len(names)} {kind} names "
            f"{names} but has {len(shape)} axes (shape {shape}); give one name (or None) per axis "
            "in nn.with_logical_partitioning / nn.with_partitioning"
        )
    names = (*names, *(None,) * (len(shape) - len(names)))
    stack, fan_in, fan_out = f.layout.split(names)
    rank = RANK_AXIS if hasattr(box, "rules") else None
    a = box.replace_boxed(f.a).replace(names=(*stack, *fan_in, rank))
    b = box.replace_boxed(f.b).replace(names=(*stack, rank, *fan_out))
    return LoraFactors(a, b, f.scale, f.layout)


def with_boxes(adapters: dict[str, Any], params: Any) -> dict[str, Any]:
    """``adapters`` with the factors of boxed weights boxed like them (see :func:`box_like`)."""
    boxes = _boxes(params)
    if not boxes:
        return adapters
    flat = {p: box_like(f, boxes[p], p) if p in boxes else f for p, f in _flat_factors(adapters)}
    return nest(flat)


def _flat_factors(adapters: dict[str, Any]) -> list[tuple[str, LoraFactors]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        adapters, is_leaf=lambda x: isinstance(x, LoraFactors)
    )
    return [(path_to_str(p), f) for p, f in flat]


def with_extras(adapters: dict[str, Any], params: Any, config: LoraConfig) -> dict[str, Any]:
    """``adapters`` plus a :class:`jlora.Trainable` copy of each leaf ``config.trainable`` selects."""
    extras = copy_extras(select_extras(params, config))
    if not extras:
        return adapters
    out = dict(adapters)
    for path, extra in extras.items():
        *parents, last = path.split("/")
        node = out
        for key in parents:
            node[key] = dict(node.get(key, {}))  # copies: draw's nested dicts stay unshared
            node = node[key]
        node[last] = extra
    return out


def init(key: jax.Array, params: Any, config: LoraConfig) -> dict[str, Any]:
    """Creates adapters for the weights of ``params`` that ``config`` targets.

    The result is a nested dict mirroring ``params`` but holding only the targeted paths, each a
    :class:`LoraFactors`. ``b = 0`` (``a = 0`` for embedding tables), so the adapted model equals the
    base at step 0. Only shapes and dtypes of targeted leaves are read: abstract leaves
    (``jax.eval_shape`` output) work too. Each leaf that ``config.trainable`` selects is copied (new
    array, the base's dtype and sharding) into a :class:`jlora.Trainable` at its own path; these
    leaves must be concrete.

    Args:
        key: a PRNG key. Each path draws from ``fold_in(key, hash(path))``, so a weight's factors do
            not depend on which other weights are targeted.
        params: the frozen base parameter pytree.
        config: which weights to adapt and how.

    Returns:
        The adapter pytree.

    Raises:
        TargetError: a target matches nothing, selects a weight of fewer than 2 axes or of an
            ambiguous shape without a layout, or asks for a rank above ``min(fan_in, fan_out)``;
            a ``trainable`` pattern matches nothing, selects a targeted or non-float leaf.
        NotAnArrayError: a targeted leaf is not an array, or a trainable one is not concrete.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"dense": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}
        >>> adapters = init(jax.random.key(0), params, LoraConfig(targets=".*kernel", rank=2))
        >>> adapters["dense"]["kernel"].a.shape, adapters["dense"]["kernel"].b.shape
        ((6, 2), (2, 4))
        >>> config = LoraConfig(targets=".*kernel", rank=2, trainable=(".*bias",))
        >>> type(init(jax.random.key(0), params, config)["dense"]["bias"]).__name__
        'Trainable'
    """
    prng_key(key, "key")
    targets = select(params, config)
    return with_extras(with_boxes(draw(key, targets, config), params), params, config)


def init_function(params: Any, config: LoraConfig) -> Callable[[jax.Array], dict[str, Any]]:
    """``key -> adapters`` for these params and config, validated now (extras not included)."""
    targets = select(params, config)
    return functools.partial(draw, targets=targets, config=config)
