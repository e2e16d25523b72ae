"""The convolution product ``scale * conv(drop(x), a) b``: ``a`` a rank-``r`` conv kernel run with
the base conv's geometry, ``b`` a mix of its ``r`` channels."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from .. import _explicit
from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from ._dropout import dropout
from ._operands import LORA_INPUT, _check_floating, _one_layer


def conv_branch(
    x: jax.Array,
    factors: LoraFactors,
    *,
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    input_dilation: Sequence[int] | None = None,
    kernel_dilation: Sequence[int] | None = None,
    dropout_rate: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """The LoRA term of a convolution: ``scale * conv(drop(x), a) b``.

    ``a`` is a conv kernel ``(*window, c_in, r)`` run with the base conv's geometry, and ``b``
    ``(r, c_out)`` mixes its ``r`` channels, so the pair is the rank-``r`` kernel
    ``a @ b`` without building it.

    Args:
        x: ``(*batch, *spatial, c_in)`` (channels last, as Flax's ``nn.Conv``).
        factors: ``a: (*window, c_in, r)``, ``b: (r, c_out)``.
        strides, padding, input_dilation, kernel_dilation: as ``jax.lax.conv_general_dilated``
            (``padding`` a string or explicit ``(low, high)`` pairs), matching the base conv.
        dropout_rate: LoRA dropout on ``x``.
        rng: PRNG key for dropout.

    Returns:
        ``(*batch, *spatial_out, c_out)`` in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = jlora.LoraFactors(jnp.ones((3, 3, 2, 1)), jnp.ones((1, 5)), 1.0, jlora.Layout(3, 1))
        >>> conv_branch(jnp.ones((4, 8, 8, 2)), f, padding="VALID").shape
        (4, 6, 6, 5)
    """
    a, b = _one_layer(factors, "conv_branch")
    _check_floating(x, "conv_branch")
    n_spatial = a.ndim - 2
    batch = x.shape[: x.ndim - n_spatial - 1]
    x = checkpoint_name(dropout(x, dropout_rate, rng), LORA_INPUT)
    lhs = x.reshape(-1, *x.shape[len(batch) :])
    dims = jax.lax.conv_dimension_numbers(lhs.shape, a.shape, _channels_last(n_spatial))
    y = jax.lax.conv_general_dilated(
        lhs,
        a.astype(x.dtype),
        window_strides=tuple(strides) if strides is not None else (1,) * n_spatial,
        padding=padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        lhs_dilation=input_dilation,
        rhs_dilation=kernel_dilation,
        dimension_numbers=dims,
        out_sharding=_explicit.rows_sharding(lhs, a),
    )
    y, b = y * factors.scale, b.astype(x.dtype)
    out = jnp.tensordot(
        y, b, axes=1, out_sharding=_explicit.dot_sharding(y, b, _explicit.matmul_dims(y.ndim))
    )
    return out.reshape(*batch, *out.shape[1:])


def _channels_last(n_spatial: int) -> tuple[str, str, str]:
    if not 1 <= n_spatial <= 3:
        raise AdapterMismatchError(f"conv_branch: {n_spatial} spatial axes; expected 1 to 3")
    spatial = "HWD"[:n_spatial]
    return f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"
