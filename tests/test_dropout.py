"""LoRA dropout's mask: distribution, exact inverted scaling, keys, independence and gradients.

The mask (``jlora/_mask.py``) draws 16 bits per entry, four entries per 64-bit ``mix64`` hash (a
4-round Feistel network). These tests pin its construction against a NumPy reference, check the
keep rate against the binomial law with the documented keep probability, and test independence
with chi-square statistics: neighbouring entries, the four pieces of one hash, entries 4 apart,
consecutive rows, keys one bit apart, layers and keys. The same statistics must flag hashes of
one and two rounds, so the tests are shown to have the power to catch a bad hash.

False alarms: each chi-square check rejects at ``p = 1e-8`` under independence; with about 400
checks in this file (seeded, so a pass is deterministic) the chance that a correct hash fails any
of them on some seed is below ``1e-5``. The binomial checks are +- 5 standard deviations.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.linen
from jlora import LoraConfig, _mask, ops

Z = 5.0  # binomial intervals: +- 5 standard deviations (false alarm ~6e-7 per check)
CHI2_1 = 32.84  # chi-square, 1 degree of freedom: P(X > 32.84) = 1e-8 under independence
CHI2_15 = 68.03  # chi-square, 15 degrees of freedom: P(X > 68.03) = 1e-8


def _keep(rate, key, shape):
    return np.asarray(ops.dropout(jnp.ones(shape), rate, key)) != 0


def _within_binomial(count, n, p, what):
    sd = np.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= Z * sd, f"{what}: {count} of {n}, expected {n * p:.1f} +- {sd:.1f}"


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_keep_rate_is_one_minus_rate_at_16_bits(rate):
    keep = _keep(rate, jax.random.key(0), (512, 1024))
    p = round((1 - rate) * 2**16) / 2**16
    assert abs(p - (1 - rate)) <= 2**-17
    _within_binomial(keep.sum(), keep.size, p, f"rate {rate}")


def test_inverted_scaling_is_exact():
    x = np.random.default_rng(0).normal(size=(64, 96)).astype(np.float32)
    y = np.asarray(ops.dropout(jnp.asarray(x), 0.1, jax.random.key(1)))
    kept = y != 0
    np.testing.assert_array_equal(y[kept], (x * np.float32(1 / 0.9))[kept])
    assert 0.85 < kept.mean() < 0.95
    y16 = ops.dropout(jnp.asarray(x, jnp.bfloat16), 0.5, jax.random.key(1))
    assert y16.dtype == jnp.bfloat16
    got = np.asarray(y16, np.float32)
    want = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) * 2  # exact: a power of two
    np.testing.assert_array_equal(got[got != 0], want[got != 0])


def _reference_mix64(k1, k2, x1, x2, rounds=4):
    """``mix64`` in NumPy uint64 arithmetic reduced mod 2**32 (the docstring's definition)."""
    m = 2**32 - 1

    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    left, right = x1.astype(np.uint64), x2.astype(np.uint64)
    for i in range(rounds):
        k = (int((k1, k2)[i % 2]) + 0x9E3779B9 * (i // 2 + 1)) & m
        left, right = right, left ^ lowbias32((right + k) & m)
    return left, right


def test_mask_is_the_documented_construction():
    """Entry j of a row: 16-bit piece j % 4 of the hash j // 4, w = ceil(n / 4) hashes a row,
    counter (first-axis index, row-major index of the rest); threshold round((1-rate) 2**16)."""
    key, rate, shape = jax.random.key(42), 0.3, (3, 5, 10)
    w = 3
    k1, k2 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    i0, i1, i2 = np.meshgrid(*(np.arange(n, dtype=np.uint32) for n in (3, 5, w)), indexing="ij")
    w1, w2 = _reference_mix64(k1, k2, i0, i1 * w + i2)
    pieces = [w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16]
    t = round((1 - rate) * 2**16)
    want = np.empty(shape, bool)
    for j in range(shape[-1]):
        want[..., j] = pieces[j % 4][..., j // 4] < t
    np.testing.assert_array_equal(_keep(rate, key, shape), want)
    # The same mask under jit, and for raw uint32 key data of the same key.
    jitted = jax.jit(lambda k: ops.dropout(jnp.ones(shape), rate, k) != 0)(key)
    np.testing.assert_array_equal(jitted, want)
    np.testing.assert_array_equal(_keep(rate, jax.random.key_data(key), shape), want)


def test_mix64_equals_the_reference_on_random_words():
    rng = np.random.default_rng(3)
    k = rng.integers(0, 2**32, 2, dtype=np.uint32)
    x = rng.integers(0, 2**32, (2, 257), dtype=np.uint32)
    for rounds in (1, 2, 4):
        got = _mask.mix64(jnp.uint32(k[0]), jnp.uint32(k[1]), *map(jnp.asarray, x), rounds)
        for g, r in zip(got, _reference_mix64(k[0], k[1], x[0], x[1], rounds), strict=True):
            np.testing.assert_array_equal(np.asarray(g), r.astype(np.uint32))


def test_keys_give_reproducible_independent_masks():
    rate, shape = 0.1, (256, 512)
    a = _keep(rate, jax.random.key(7), shape)
    np.testing.assert_array_equal(a, _keep(rate, jax.random.key(7), shape))
    b = _keep(rate, jax.random.key(8), shape)
    folded = _keep(rate, jax.random.fold_in(jax.random.key(7), 1), shape)
    p = round((1 - rate) * 2**16) / 2**16
    agree = p**2 + (1 - p) ** 2  # two independent masks agree on an entry with this probability
    for other, what in ((b, "key 7 vs 8"), (folded, "key vs fold_in(key, 1)")):
        _within_binomial((a == other).sum(), a.size, agree, what)


def _chi2(a, b):
    """Pearson's chi-square of the 2x2 table of two bool arrays (1 degree of freedom)."""
    n = a.size
    observed = np.array([[np.sum(~a & ~b), np.sum(~a & b)], [np.sum(a & ~b), np.sum(a & b)]])
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / n
    return float(np.sum((observed - expected) ** 2 / expected))


def _hash(rounds):
    return None if rounds == _mask.ROUNDS else functools.partial(_mask.mix64, rounds=rounds)


@functools.cache
def _drawer(rounds, rate, shape):
    return jax.jit(lambda k1, k2: _mask.keep_from_words(k1, k2, rate, shape, _hash(rounds)))


def _draw(rounds, rate, shape, k1=0x1234ABCD, k2=0x0F0F5A5A):
    return np.asarray(_drawer(rounds, rate, shape)(jnp.uint32(k1), jnp.uint32(k2)))


def _within_mask_statistics(keep):
    """Chi-square statistics of the pairs a bad hash would correlate, within one mask."""
    stats = {f"lag {lag}": _chi2(keep[:, :-lag], keep[:, lag:]) for lag in (1, 2, 3, 4, 8)}
    stats["consecutive rows"] = _chi2(keep[:-1], keep[1:])
    # The four pieces of one hash jointly: 16 cells, 15 degrees of freedom, scaled to CHI2_1.
    pieces = keep.reshape(-1, 4).astype(np.int64) @ np.array([1, 2, 4, 8])
    p = keep.mean()
    ones = np.array([bin(c).count("1") for c in range(16)])
    expected = pieces.size * p**ones * (1 - p) ** (4 - ones)
    joint = float(np.sum((np.bincount(pieces, minlength=16) - expected) ** 2 / expected))
    stats["pieces of one hash (joint)"] = joint * CHI2_1 / CHI2_15
    return stats


def _key_bit_statistics(rounds, rate, shape=(64, 256)):
    """Chi-square of the masks of hash keys that differ in one bit (each of the 64)."""
    k1, k2 = 0x1234ABCD, 0x0F0F5A5A
    base = _draw(rounds, rate, shape, k1, k2)
    flipped = [(k1 ^ (1 << b), k2) for b in range(32)] + [(k1, k2 ^ (1 << b)) for b in range(32)]
    return {f"key bit {i}": _chi2(base, _draw(rounds, rate, shape, *k)) for i, k in enumerate(flipped)}


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_entries_rows_and_pieces_of_one_hash_are_independent(rate):
    keep = _draw(_mask.ROUNDS, rate, (1024, 512))
    bad = {k: v for k, v in _within_mask_statistics(keep).items() if v > CHI2_1}
    assert not bad, f"dependent at rate {rate} (chi-square > {CHI2_1}): {bad}"


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_keys_one_bit_apart_draw_independent_masks(rate):
    bad = {k: v for k, v in _key_bit_statistics(_mask.ROUNDS, rate).items() if v > CHI2_1}
    assert not bad, f"dependent at rate {rate} (chi-square > {CHI2_1}): {bad}"


def test_the_checks_reject_weak_hashes():
    """The same statistics flag a one-round hash (entries of a row) and a two-round hash (rows and
    keys one bit apart): two rounds leave the first word's high half a function of the row's
    index and the first key word only."""
    one = _within_mask_statistics(_draw(1, 0.5, (1024, 512)))
    assert min(one[f"lag {lag}"] for lag in (4, 8)) > 100 * CHI2_1, one
    two = _within_mask_statistics(_draw(2, 0.5, (1024, 512)))
    assert two["consecutive rows"] > 100 * CHI2_1, two
    keys = _key_bit_statistics(2, 0.5)
    flagged = sum(v > CHI2_1 for v in keys.values())
    assert flagged >= 32, f"only {flagged} of 64 one-bit key changes flagged for two rounds"


class _Twins(nn.Module):
    """Three Dense layers on the same input, as q, k, v."""

    @nn.compact
    def __call__(self, x):
        return tuple(nn.Dense(x.shape[-1], name=n)(x) for n in ("q", "k", "v"))


def test_layers_on_one_input_draw_independent_masks():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(512, 64)), jnp.float32)
    model = _Twins()
    params = model.init(jax.random.key(0), x)["params"]
    adapted = jlora.linen.lora(model, LoraConfig(targets=".*kernel", rank=64, dropout=0.25))
    eye = jlora.LoraFactors(jnp.eye(64), jnp.eye(64), 1.0, jlora.Layout(1, 1))
    adapters = {n: {"kernel": eye} for n in ("q", "k", "v")}
    base = model.apply({"params": params}, x)
    out = adapted.apply(params, adapters, x, rngs={"dropout": jax.random.key(2)}, lora_train=True)
    # a = b = I and scale 1: each term is drop(x) itself, so its mask is where it is not zero.
    masks = [np.abs(np.asarray(o - b)) > 1e-3 * np.abs(np.asarray(x)) for o, b in zip(out, base)]
    p = round(0.75 * 2**16) / 2**16
    agree = p**2 + (1 - p) ** 2
    for i, j in ((0, 1), (0, 2), (1, 2)):
        _within_binomial((masks[i] == masks[j]).sum(), masks[i].size, agree, f"layers {i}, {j}")


def test_gradient_uses_the_forward_mask():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(32, 48)).astype(np.float32))
    g = rng.normal(size=(32, 48)).astype(np.float32)
    key = jax.random.key(9)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ops.dropout(x, 0.2, key) * g)))(x)
    keep = _keep(0.2, key, x.shape)
    np.testing.assert_array_equal(grad, np.where(keep, g * np.float32(1 / 0.8), 0.0))


def test_too_many_entries_per_leading_index_is_an_error():
    x = jax.ShapeDtypeStruct((2, 2**20, 2**14), jnp.float32)
    with pytest.raises(ValueError, match=r"has more than 2\*\*34 entries per index of its first"):
        jax.eval_shape(lambda x: ops.dropout(x, 0.1, jax.random.key(0)), x)
