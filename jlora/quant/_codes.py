"""Block-wise code books: NF4 and int4 (4-bit, packed two per byte), int8, and their absmax scales.

NF4 (NormalFloat 4, Dettmers et al. 2023, "QLoRA", section 3 and appendix E) stores each weight as
the index of the nearest of 16 fixed code values in ``[-1, 1]`` after dividing its block of
``block_size`` consecutive values by the block's absmax ``c``:

    q = argmin_k |w / c - NF4[k]|        w' = NF4[q] * c

The code values are the quantiles of N(0, 1) that bitsandbytes' ``create_normal_map(0.9677083)``
computes (8 positive, 7 negative, an exact zero), normalised to ``[-1, 1]``; :data:`NF4_CODES` holds
the published float32 table. int4 uses the 15 uniform codes ``k / 7`` for ``k = -7..7``; int8
(:func:`int8_quantize`) one absmax scale per output channel and codes ``round(127 w / c)``.

Packing follows bitsandbytes: element ``2j`` goes to the high nibble of byte ``j``, ``2j + 1`` to
the low nibble, along the weight's last axis, so blocks (and packed bytes) never straddle rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Appendix E of Dettmers et al. 2023 / bitsandbytes' NF4 table (float32), in code-index order.
NF4_CODES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# int4: the symmetric codes k / 7, k = -7..7, at indices 1..15 (index 0 is unused, as -8 would be).
INT4_CODES = np.concatenate([[-1.0], np.arange(-7, 8) / 7.0]).astype(np.float32)

CODE_BOOKS = {"nf4": NF4_CODES, "int4": INT4_CODES}
DQ_BLOCK = 256  # the block size of the double quantisation of the absmax constants (the paper's)


def largest_gap(kind: str) -> float:
    """The largest distance between neighbouring codes of a 4-bit code book."""
    return float(np.max(np.diff(CODE_BOOKS[kind])))


def block_absmax(w: jax.Array, block_size: int) -> jax.Array:
    """``(*lead, n // block_size)`` float32 absmax of each block of the last axis."""
    blocks = w.astype(jnp.float32).reshape(*w.shape[:-1], -1, block_size)
    return jnp.max(jnp.abs(blocks), axis=-1)


def encode(w: jax.Array, absmax: jax.Array, kind: str, block_size: int) -> jax.Array:
    """Packed ``uint8`` codes ``(*lead, n // 2)`` of ``w`` for the per-block ``absmax``.

    Values beyond a (double-quantised, so slightly smaller) absmax clamp to the end codes.
    """
    codes = jnp.asarray(CODE_BOOKS[kind])
    safe = jnp.where(absmax > 0, absmax, jnp.ones((), jnp.float32))
    blocks = w.astype(jnp.float32).reshape(*w.shape[:-1], -1, block_size)
    x = blocks / safe[..., None]
    # Nearest code by the midpoints between neighbours (ties go to the larger code).
    midpoints = (codes[1:] + codes[:-1]) / 2
    if kind == "int4":
        midpoints = midpoints.at[0].set(-jnp.inf)  # index 0 is never chosen
    index = jnp.searchsorted(midpoints, x.reshape(-1), side="right").astype(jnp.uint8)
    index = index.reshape(*w.shape[:-1], w.shape[-1] // 2, 2)
    return (index[..., 0] << 4) | index[..., 1]


def decode(packed: jax.Array, absmax: jax.Array, kind: str, block_size: int) -> jax.Array:
    """float32 ``(*lead, n)`` weights from packed codes and the per-block ``absmax``."""
    index = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(*packed.shape[:-1], -1)
    values = jnp.asarray(CODE_BOOKS[kind])[index.astype(jnp.int32)]
    blocks = values.reshape(*values.shape[:-1], -1, block_size) * absmax[..., None]
    return blocks.reshape(values.shape)


def int8_quantize(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(codes int8, scale float32)`` with ``scale = absmax / 127`` reduced over ``axes``."""
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, jnp.ones((), jnp.float32))
    return jnp.clip(jnp.round(w32 / safe), -127, 127).astype(jnp.int8), scale


def int8_dequantize(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 weights ``codes * scale``."""
    return codes.astype(jnp.float32) * scale


def _per_slice(fn, n_stack: int):
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    return fn


def double_quantize(
    absmax: jax.Array, n_stack: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The paper's double quantisation of the absmax constants, to 8 bits in blocks of 256.

    Returns ``(codes int8 like absmax, scales float32 (ceil(n / 256),), offset float32 ())``:
    the mean is subtracted (the constants are positive, so this centres them for the symmetric
    code), then each block of 256 stores ``round(127 (c - mean) / absmax_block)``. With
    ``n_stack`` leading stack axes each slice is double-quantised on its own (scales
    ``(*stack, blocks)``, offset ``(*stack,)``), so no block straddles two slices.
    """
    return _per_slice(_double_quantize, n_stack)(absmax)


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    offset = jnp.mean(absmax)
    flat = (absmax - offset).reshape(-1)
    pad = (-flat.shape[0]) % DQ_BLOCK
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, DQ_BLOCK)
    scale = jnp.max(jnp.abs(blocks), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, jnp.ones((), jnp.float32))
    codes = jnp.clip(jnp.round(blocks / safe[:, None]), -127, 127).astype(jnp.int8)
    return codes.reshape(-1)[: flat.shape[0]].reshape(absmax.shape), scale, offset


def double_dequantize(
    codes: jax.Array, scale: jax.Array, offset: jax.Array, n_stack: int = 0
) -> jax.Array:
    """float32 absmax constants from :func:`double_quantize`'s output (same ``n_stack``)."""
    return _per_slice(_double_dequantize, n_stack)(codes, scale, offset)


def _double_dequantize(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    flat = codes.reshape(-1).astype(jnp.float32)
    pad = (-flat.shape[0]) % DQ_BLOCK
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, DQ_BLOCK) * scale[:, None]
    return (blocks.reshape(-1)[: flat.shape[0]] + offset).reshape(codes.shape)
