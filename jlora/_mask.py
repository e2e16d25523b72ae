"""LoRA dropout's keep mask: 16 random bits per element, four elements per Threefry hash.

``jax.random.bernoulli`` spends one Threefry-2x32 hash (20 rounds) on each element and compares a
float built from 23 of its bits. A dropout mask needs far fewer bits: here each hash of a counter
gives two 32-bit words, split into four 16-bit draws ``u``, and an element is kept when
``u < t`` with ``t = round((1 - rate) * 2**16)``. That is a quarter of the hashes and integer
compares only; on XLA:CPU the mask costs about a quarter of ``bernoulli``'s
(``benchmarks/results/dropout-cpu.md``).

**Distribution.** Every element gets its own 16 bits of a distinct hash output, so the elements are
independent Bernoulli draws with keep probability exactly ``t / 2**16``: ``1 - rate`` rounded to a
multiple of ``2**-16`` (off by at most ``2**-17``; exact for rates that are multiples of
``2**-16`` such as 0.5 or 0.25; 0.1 keeps with probability ``58982 / 65536 = 0.899994``). Rates
below ``2**-17`` therefore keep every element.

**Keys.** The hash is keyed by two words drawn with ``jax.random.bits`` from the caller's key (any
key implementation, typed or raw), so the mask is a pure function of that key and the shape, the
same on every backend (Threefry is computed by the same integer program everywhere), and unrelated
to other draws from the same key. A row of ``n`` entries (the last axis) uses ``w = ceil(n / 4)``
hashes; entry ``j`` takes 16-bit piece ``j % 4`` (low then high half of the first word, then of
the second) of hash ``j // 4``. The hash of row entry ``j`` is counter ``(hi, lo)`` = (the index
along the first axis, the row-major index of ``(other leading axes, j // 4)``), laid out in the
input's shape, so sharding the leading axes partitions the hash. (Until session 6 entry ``j``
took piece ``j // w`` of hash ``j % w``: the same distribution, other bits; XLA:CPU did not
vectorise unpacking that layout in the fused passes that read the mask.)

**Once per hash.** XLA fuses elementwise producers into every consumer; left alone it would
recompute the hash for each of the four entries that read it (and again in the backward pass). The
four keep bits are packed into one word behind an integer remainder that XLA treats as expensive,
so each hash runs once and the forward and backward passes read the packed words; entry ``j``
reads bit ``j % 4`` of word ``j // 4``, a pattern XLA:CPU vectorises inside those passes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BITS = 16  # random bits per element: the keep probability is a multiple of 2**-BITS
_PER_HASH = 64 // BITS  # entries per hash: its two 32-bit words in 16-bit pieces
_LOW = np.uint32(2**BITS - 1)


def threshold(rate: float | jax.Array) -> jax.Array:
    """``round((1 - rate) * 2**16)`` as uint32: keep an element when its 16 bits are below it."""
    if isinstance(rate, jax.core.Tracer):
        return jnp.round((1.0 - rate) * 2**BITS).astype(jnp.uint32)
    return jnp.asarray(np.uint32(round((1.0 - float(rate)) * 2**BITS)))


def keep_mask(rng: jax.Array, rate: float | jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A bool mask of ``shape``: each entry True with probability ``threshold(rate) / 2**16``."""
    if not shape:
        return keep_mask(rng, rate, (1,)).reshape(())
    lead, last = shape[:-1], shape[-1]
    words = -(-last // _PER_HASH)  # hashes per row; entry j of a row is piece j % 4 of hash
    if math.prod((*lead, words)[1:]) >= 2**32:  # j // 4
        raise ValueError(
            f"LoRA dropout: the input's shape {shape} has more than 2**34 entries per index of its "
            "first axis, more than the mask's counters address; reshape it so that the first axis "
            "is longer (e.g. flatten batch and sequence axes into one)"
        )
    hi, lo = _counters((*lead, words))
    k1, k2 = jax.random.bits(rng, (2,), jnp.uint32)
    w1, w2 = threefry2x32(k1, k2, hi, lo)
    t = threshold(rate)
    packed = jnp.zeros(w1.shape, jnp.uint32)
    for i, piece in enumerate(w >> np.uint32(BITS * j) for w in (w1, w2) for j in range(2)):
        packed = packed | ((piece & _LOW) < t).astype(jnp.uint32) << np.uint32(i)
    # A no-op (packed < 16) that XLA counts as expensive: it will not then copy the hash into each
    # of the four entries that read this word, so the hash runs once per word, not once per entry.
    packed = packed % np.uint32(17)
    # Entry j of a row reads bit j % 4 of word j // 4: XLA:CPU vectorises that unpacking in the
    # fused passes that read it; it did not for bit j // words of word j % words.
    shift = jax.lax.broadcasted_iota(jnp.uint32, (*lead, words, _PER_HASH), len(lead) + 1)
    bits = (jnp.broadcast_to(packed[..., None], shift.shape) >> shift) & np.uint32(1)
    keep = bits.reshape(*lead, words * _PER_HASH) != 0
    return keep[..., :last] if keep.shape[-1] != last else keep


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(
    k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash (20 rounds), unrolled: the same words as ``jax.random``'s.

    jax lowers its own ``threefry2x32`` on CPU as a rolled loop of five steps, each step's arrays
    written to memory and read back; unrolled with constant rotations, XLA fuses the whole hash
    (and the compares after it) into one elementwise loop, several times faster there.
    """
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for step in range(5):
        for r in _ROTATIONS[step % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
        x1 = x1 + ks[(step + 1) % 3]
        x2 = x2 + ks[(step + 2) % 3] + np.uint32(step + 1)
    return x1, x2


def _counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Unique ``(hi, lo)`` uint32 counters in ``shape``: hi the leading index, lo the rest's
    row-major index (a sum of broadcast iotas, which the SPMD partitioner can split)."""
    hi = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    lo = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, 0, -1):
        lo = lo + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return hi, lo
