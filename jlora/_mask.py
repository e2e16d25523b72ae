"""LoRA dropout's keep mask: 16 random bits per element, four elements per 64-bit keyed hash.

``jax.random.bernoulli`` spends one Threefry-2x32 hash (20 rounds) on each element and compares a
float built from 23 of its bits. A dropout mask needs far fewer bits: here each hash of a counter
gives two 32-bit words, split into four 16-bit draws ``u``, and an element is kept when
``u < t`` with ``t = round((1 - rate) * 2**16)``. That is a quarter of the hashes and integer
compares only.

**The hash** (``mix64``) is a four-round Feistel network on the counter's two 32-bit words: each
round replaces ``(left, right)`` by ``(right, left ^ f(right + k))`` with a round key ``k`` (the
two key words in turn, each plus a multiple of the golden-ratio constant ``0x9E3779B9``) and ``f``
a fixed 32-bit multiply-xorshift bijection, the ``lowbias32`` mixer of Wellons' hash-prospector
(``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``). Four rounds
are a keyed permutation of the 64-bit counter (Luby and Rackoff 1988: a 4-round Feistel network of
random round functions is a strong pseudo-random permutation); three already flip each output bit
with probability 1/2 for any one flipped bit of counter or key, two do not. It is built from
uint32 adds, xors, shifts and multiplies, which XLA:CPU vectorises: 0.7 ns per hash on one AVX-512
core against 1.6 for Threefry-2x32 (20 rounds; Salmon et al. 2011 report 13 as its fewest
Crush-resistant rounds), which this mask used until session 7 (``benchmarks/results/
dropout-cpu.md``). ``tests/test_dropout.py`` checks keep rates, pairwise independence of
neighbouring entries, of the pieces of one hash, of consecutive rows and of keys one bit apart, and
that the same checks fail for two rounds.

**Distribution.** Every element gets its own 16 bits of a distinct hash output, so the elements are
Bernoulli draws with keep probability ``t / 2**16``: ``1 - rate`` rounded to a multiple of
``2**-16`` (off by at most ``2**-17``; exact for rates that are multiples of ``2**-16`` such as
0.5 or 0.25; 0.1 keeps with probability ``58982 / 65536 = 0.899994``). Rates below ``2**-17``
therefore keep every element.

**Keys.** The hash is keyed by two words drawn with ``jax.random.bits`` from the caller's key (any
key implementation, typed or raw), so the mask is a pure function of that key and the shape, the
same on every backend (the same integer program everywhere), and unrelated to other draws from the
same key. A row of ``n`` entries (the last axis) uses ``w = ceil(n / 4)`` hashes; entry ``j``
takes 16-bit piece ``j % 4`` (low then high half of the first word, then of the second) of hash
``j // 4``. The hash of row entry ``j`` is counter ``(hi, lo)`` = (the index along the first axis,
the row-major index of ``(other leading axes, j // 4)``), laid out in the input's shape, so
sharding the leading axes partitions the hash.

**Once per hash.** XLA fuses elementwise producers into every consumer; left alone it would
recompute the hash for each of the four entries that read it (and again in the backward pass). The
four keep bits are packed into one word behind an integer remainder that XLA treats as expensive,
so each hash runs once and the forward and backward passes read the packed words; entry ``j``
reads bit ``j % 4`` of word ``j // 4``, a pattern XLA:CPU vectorises inside those passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

BITS = 16  # random bits per element: the keep probability is a multiple of 2**-BITS
ROUNDS = 4  # Feistel rounds of ``mix64``
_PER_HASH = 64 // BITS  # entries per hash: its two 32-bit words in 16-bit pieces
_LOW = np.uint32(2**BITS - 1)
_GOLDEN = 0x9E3779B9
_MULTIPLIERS = (np.uint32(0x7FEB352D), np.uint32(0x846CA68B))

Hash = Callable[..., tuple[jax.Array, jax.Array]]  # (k1, k2, x1, x2) -> two uint32 words


def threshold(rate: float | jax.Array) -> jax.Array:
    """``round((1 - rate) * 2**16)`` as uint32: keep an element when its 16 bits are below it."""
    if isinstance(rate, jax.core.Tracer):
        return jnp.round((1.0 - rate) * 2**BITS).astype(jnp.uint32)
    return jnp.asarray(np.uint32(round((1.0 - float(rate)) * 2**BITS)))


def keep_mask(rng: jax.Array, rate: float | jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A bool mask of ``shape``: each entry True with probability ``threshold(rate) / 2**16``."""
    k1, k2 = jax.random.bits(rng, (2,), jnp.uint32)
    return keep_from_words(k1, k2, rate, shape)


def keep_from_words(
    k1: jax.Array,
    k2: jax.Array,
    rate: float | jax.Array,
    shape: tuple[int, ...],
    hash_fn: Hash | None = None,
) -> jax.Array:
    """``keep_mask`` for the hash key words ``(k1, k2)``; ``hash_fn`` (default ``mix64``) for tests."""
    if not shape:
        return keep_from_words(k1, k2, rate, (1,), hash_fn).reshape(())
    lead, last = shape[:-1], shape[-1]
    words = -(-last // _PER_HASH)  # hashes per row; entry j of a row is piece j % 4 of hash
    if math.prod((*lead, words)[1:]) >= 2**32:  # j // 4
        raise ValueError(
            f"LoRA dropout: the input's shape {shape} has more than 2**34 entries per index of its "
            "first axis, more than the mask's counters address; reshape it so that the first axis "
            "is longer (e.g. flatten batch and sequence axes into one)"
        )
    hi, lo = _counters((*lead, words))
    w1, w2 = (hash_fn or mix64)(k1, k2, hi, lo)
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


def mix64(
    k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array, rounds: int = ROUNDS
) -> tuple[jax.Array, jax.Array]:
    """The mask's hash: a Feistel network of ``rounds`` rounds on the counter words ``(x1, x2)``.

    Round ``i`` (from 0) maps ``(left, right)`` to ``(right, left ^ f(right + k_i))``, with
    ``k_i = (k1, k2)[i % 2] + (i // 2 + 1) * 0x9E3779B9`` (mod ``2**32``) and ``f`` the
    ``lowbias32`` multiply-xorshift bijection; it starts from ``(x1, x2)`` and returns the final
    ``(left, right)``. All arithmetic is uint32, wrapping.
    """
    left, right = x1, x2
    for i in range(rounds):
        k = (k1, k2)[i % 2] + np.uint32((_GOLDEN * (i // 2 + 1)) % 2**32)
        left, right = right, left ^ _lowbias32(right + k)
    return left, right


def _lowbias32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> np.uint32(16))
    x = x * _MULTIPLIERS[0]
    x = x ^ (x >> np.uint32(15))
    x = x * _MULTIPLIERS[1]
    return x ^ (x >> np.uint32(16))


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
