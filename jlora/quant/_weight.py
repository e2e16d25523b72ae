"""`QuantizedWeight`: a frozen weight stored in 4 or 8 bits, a pytree node that dequantises itself.

Only arrays are leaves (``codes``, ``scales`` and, with double quantisation, ``scale_scales`` and
``scale_offset``); the kind, dtype, block size and int8's reduced axes are static metadata, so
``jax.jit`` compiles once per quantised model and orbax saves the arrays as they are.

Stacked weights. The weight's shape is read from its codes, int8's reduced axes are counted from
the end, and the double-quantisation constants of a weight with leading stack axes (``nn.scan``,
``nnx.vmap``) are kept per stack slice (``scale_scales (*stack, blocks)``, ``scale_offset
(*stack,)``). So slicing every array of a :class:`QuantizedWeight` along a leading stack axis, as
``jax.lax.scan`` does, gives the :class:`QuantizedWeight` of that slice, bit for bit the one
quantising the slice alone would give: no block straddles two slices.

Inside Flax the node is a ``flax.core.meta.AxisMetadata`` box (registered, not subclassed, so this
module imports no Flax): ``self.param('kernel', ...)`` unboxes it to the dequantised weight, tagged
:data:`DEQUANTIZED` for :func:`jlora.quant.remat`. So any Linen layer, adapted or not, computes
with ``dequantize(q)`` built inside its own call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from .._errors import AdapterMismatchError
from . import _codes

KINDS = ("nf4", "int4", "int8")
DEQUANTIZED = "jlora_dequantized"  # jax.ad_checkpoint name of every dequantised weight


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One weight in NF4, int4 (block-wise absmax) or int8 (per-output-channel absmax).

    Attributes:
        codes: 4-bit kinds: ``uint8 (*shape[:-1], shape[-1] // 2)``, two codes per byte along the
            last axis; int8: ``int8`` of the weight's shape.
        scales: 4-bit kinds: the absmax of each block of ``block_size`` values along the last
            axis, ``(*shape[:-1], shape[-1] // block_size)``, float32, or with double
            quantisation its int8 codes; int8: ``absmax / 127`` per output channel (float32,
            the reduced axes kept with size 1).
        scale_scales: double quantisation only: float32 scale of each block of 256 constants,
            ``(*stack, blocks)`` (the constants of each stack slice blocked on their own).
        scale_offset: double quantisation only: the float32 mean subtracted from the constants,
            ``(*stack,)``.
        kind: ``"nf4"``, ``"int4"`` or ``"int8"``.
        dtype: the weight's dtype name; :func:`dequantize` returns it.
        block_size: values per absmax block (4-bit kinds; 0 for int8).
        axes: int8 only: the fan-in axes the absmax reduces over, counted from the end
            (``(-2,)`` for a ``(fan_in, fan_out)`` kernel), so they hold for a stack slice too.

    Example:
        >>> import jax.numpy as jnp, jlora.quant
        >>> w = jnp.linspace(-1.0, 1.0, 128).reshape(2, 64)
        >>> q = jlora.quant.quantize({"kernel": w}, "kernel", kind="nf4")["kernel"]
        >>> q.codes.shape, q.codes.dtype.name, q.nbytes < w.nbytes / 6
        ((2, 32), 'uint8', True)
    """

    codes: jax.Array
    scales: jax.Array
    scale_scales: jax.Array | None
    scale_offset: jax.Array | None
    kind: str = dataclasses.field(metadata={"static": True})
    dtype: str = dataclasses.field(metadata={"static": True})
    block_size: int = dataclasses.field(default=0, metadata={"static": True})
    axes: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (4-bit codes pack two values per byte along the last axis)."""
        shape = tuple(self.codes.shape)
        return shape if self.kind == "int8" else (*shape[:-1], 2 * shape[-1])

    @property
    def reduced_axes(self) -> tuple[int, ...]:
        """int8: the reduced axes as non-negative indices of :attr:`shape` (``()`` otherwise)."""
        return tuple(sorted(a % self.ndim for a in self.axes))

    @property
    def stack_ndim(self) -> int:
        """Leading axes whose slices carry their own double-quantisation constants (0 without)."""
        return 0 if self.scale_offset is None else len(self.scale_offset.shape)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are themselves quantised (8-bit, blocks of 256)."""
        return self.scale_scales is not None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (codes, scales and double-quantisation constants)."""
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    def __getitem__(self, index: Any) -> jax.Array:
        """``q[...]`` is the dequantised weight (as ``nnx.Linear`` reads ``self.kernel[...]``)."""
        if index is not Ellipsis:
            raise TypeError(
                f"a quantised ({self.kind}) weight of shape {self.shape} can only be read whole, "
                f"as q[...] (got q[{index!r}]); jlora.quant.dequantize(q) gives the float array"
            )
        return dequantize(self)

    # flax.core.meta.AxisMetadata: Flax's `self.param` unboxes a stored value to what it computes.
    def unbox(self, apply_constraint: bool = True) -> jax.Array:
        """The dequantised weight (tagged :data:`DEQUANTIZED`); Flax calls this in ``param``."""
        del apply_constraint
        return jax.ad_checkpoint.checkpoint_name(dequantize(self), DEQUANTIZED)

    def replace_boxed(self, value: Any) -> Any:
        raise AdapterMismatchError(
            f"a quantised ({self.kind}) weight of shape {self.shape} cannot take a new float "
            "value in place (jlora.merge, or a Flax transform that rewrites params); merge onto a "
            "quantised base with jlora.quant.merge(qparams, adapters, dtype=...), which returns "
            "float weights (and re-quantises them with requantize=True)"
        )

    # nn.scan / nn.vmap slice (or stack) every array along ``index``; the metadata is read from
    # the arrays, so a slice needs no change, only the check that every array has that axis.
    def remove_axis(self, index: int, params: Any) -> Any:
        """Checks that ``index`` is a stack axis of every array; the box itself is unchanged."""
        del params
        why = slice_problem(self, index)
        if why is not None:
            raise AdapterMismatchError(
                f"a quantised ({self.kind}) weight of shape {self.shape} cannot be sliced along "
                f"axis {index} (nn.scan / nn.vmap): {why}"
            )
        return self

    def add_axis(self, index: int, params: Any) -> Any:
        """A lifted transform stacking slices: the arrays carry the new axis; nothing to change."""
        del index, params
        return self


jax.tree_util.register_dataclass(
    QuantizedWeight,
    data_fields=["codes", "scales", "scale_scales", "scale_offset"],
    meta_fields=["kind", "dtype", "block_size", "axes"],
)


def slice_problem(q: QuantizedWeight, index: int) -> str | None:
    """Why slicing every array of ``q`` along ``index`` would not give a valid slice, or None."""
    ndim = q.ndim
    if not -ndim <= index < ndim:
        return f"it has {ndim} axes"
    index %= ndim
    if q.kind == "int8":
        if index in q.reduced_axes:
            return (
                f"axis {index} is one of the fan-in axes {q.reduced_axes} its per-channel absmax "
                "reduces over; quantise it with a layout whose leading 's' axes are the stack "
                "axes (LoraConfig.layouts, e.g. 'sio', or jlora.linen's infer_layouts)"
            )
        return None
    if index == ndim - 1:
        return "the last axis holds the packed codes and their blocks"
    if q.double_quant and index >= q.stack_ndim:
        return (
            f"its double-quantisation constants are blocked per slice of its first "
            f"{q.stack_ndim} axes only; quantise it with a layout whose leading 's' axes are the "
            "stack axes (LoraConfig.layouts, e.g. 'sio', or jlora.linen's infer_layouts)"
        )
    return None


def _register_with_flax() -> None:
    try:
        from flax.core import meta
    except ImportError:  # pragma: no cover - flax is a dependency; the core must not need it
        return
    meta.AxisMetadata.register(QuantizedWeight)


_register_with_flax()


def absmax_of(q: QuantizedWeight) -> jax.Array:
    """The float32 per-block absmax constants of a 4-bit weight (double-dequantised if need be)."""
    if not q.double_quant:
        return q.scales
    return _codes.double_dequantize(q.scales, q.scale_scales, q.scale_offset, q.stack_ndim)


def dequantize(q: Any, dtype: Any = None) -> Any:
    """The float weight a :class:`QuantizedWeight` stores, in its original dtype.

    Exact given the stored codes: the same codes and scales give the same weight on every call
    (``code * absmax`` in float32, one rounding to the dtype). Traceable: inside ``jax.jit`` XLA
    fuses it into its consumer. A params tree dequantises leaf by leaf (other leaves unchanged).

    Args:
        q: a :class:`QuantizedWeight`, or a pytree holding some.
        dtype: the result's dtype; None for the weight's original dtype. ``jnp.float32`` returns
            ``code * absmax`` unrounded.

    Returns:
        An array of ``q.shape`` (or the tree with every weight dequantised).

    Example:
        >>> import jax.numpy as jnp, jlora.quant
        >>> w = jnp.arange(-128.0, 128.0).reshape(4, 64) / 128
        >>> q = jlora.quant.quantize({"w": w}, "w", kind="int8")["w"]
        >>> bool(jnp.abs(jlora.quant.dequantize(q) - w).max() <= 1 / 254)
        True
    """
    if not isinstance(q, QuantizedWeight):
        return jax.tree.map(
            lambda x: dequantize(x, dtype) if isinstance(x, QuantizedWeight) else x,
            q,
            is_leaf=lambda x: isinstance(x, QuantizedWeight),
        )
    if q.kind == "int8":
        w = _codes.int8_dequantize(q.codes, q.scales)
    else:
        w = _codes.decode(q.codes, absmax_of(q), q.kind, q.block_size)
    return w.astype(q.dtype if dtype is None else dtype)


def abstract(params: Any) -> Any:
    """``params`` with each :class:`QuantizedWeight` as a ``jax.ShapeDtypeStruct`` of its weight.

    For code that needs only shapes, e.g. ``jlora.init(key, abstract(qparams), config)``, which then
    dequantises nothing.
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, QuantizedWeight) else x,
        params,
        is_leaf=lambda x: isinstance(x, QuantizedWeight),
    )


def nbytes(params: Any) -> int:
    """Bytes of every array in ``params`` (quantised weights count their stored arrays)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
