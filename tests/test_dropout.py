"""LoRA dropout's mask: distribution, exact inverted scaling, keys, independence and gradients.

The mask (``jlora/_mask.py``) draws 16 bits per entry, four entries per Threefry-2x32 hash. These
tests pin its construction against jax's own Threefry primitive, check the keep rate against the
binomial law with the documented keep probability, and check that masks of different keys, layers
and entries of one hash are independent.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

import jlora
import jlora.linen
from jlora import LoraConfig, _mask, ops

Z = 5.0  # binomial intervals: +- 5 standard deviations (false alarm ~6e-7 per check)


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


def test_mask_is_the_documented_threefry_construction():
    """Entry j of a row: 16-bit piece j % 4 of the hash j // 4, w = ceil(n / 4) hashes a row,
    counter (first-axis index, row-major index of the rest); threshold round((1-rate) 2**16)."""
    key, rate, shape = jax.random.key(42), 0.3, (3, 5, 10)
    w = 3
    k1, k2 = (jnp.uint32(k) for k in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
    i0, i1, i2 = np.meshgrid(*(np.arange(n, dtype=np.uint32) for n in (3, 5, w)), indexing="ij")
    w1, w2 = threefry2x32_p.bind(k1, k2, jnp.asarray(i0), jnp.asarray(i1 * w + i2))
    w1, w2 = np.asarray(w1), np.asarray(w2)
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


def test_unrolled_threefry_equals_jax():
    rng = np.random.default_rng(3)
    k = rng.integers(0, 2**32, 2, dtype=np.uint32)
    x = rng.integers(0, 2**32, (2, 257), dtype=np.uint32)
    args = (jnp.uint32(k[0]), jnp.uint32(k[1]), jnp.asarray(x[0]), jnp.asarray(x[1]))
    for got, want in zip(_mask.threefry2x32(*args), threefry2x32_p.bind(*args), strict=True):
        np.testing.assert_array_equal(got, want)


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


def test_entries_sharing_a_hash_or_a_row_are_independent():
    rate, shape = 0.5, (2048, 64)  # w = 16 hashes a row
    keep = _keep(rate, jax.random.key(5), shape)
    p = 0.5
    lags = ((1, "same hash, next piece"), (2, "same hash, word 2"), (4, "next hash, same piece"))
    for lag, what in (*lags, (16, "hashes 4 apart")):
        both = (keep[:, :-lag] & keep[:, lag:]).sum()
        _within_binomial(both, keep[:, lag:].size, p * p, what)
    rows = keep.mean(axis=0)  # every column keeps at rate p: no column pattern
    assert np.all(np.abs(rows - p) <= Z * np.sqrt(p * (1 - p) / shape[0]))


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
