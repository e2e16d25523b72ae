"""jlora.quant: NF4/int4/int8 code books, round-trip bounds, bytes, pytree/sharding/orbax handling."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
import jlora.quant as jq
from jlora.quant import _codes

# Appendix E of Dettmers et al. 2023 (and bitsandbytes' NF4 table), copied here independently.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def _weight(shape, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 0.05, dtype)


def test_nf4_codes_are_the_published_table_and_its_derivation():
    np.testing.assert_array_equal(_codes.NF4_CODES, np.array(PUBLISHED_NF4, np.float32))
    # bitsandbytes' create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0, 1)
    # quantiles plus an exact zero, normalised by the largest.
    normal, offset = NormalDist(), 0.9677083
    positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    derived = np.sort(np.array([*positive, 0.0, *negative]))
    np.testing.assert_allclose(_codes.NF4_CODES, derived / derived.max(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_four_bit_round_trip_within_half_the_largest_gap(kind, double_quant):
    w = _weight((32, 256), seed=0)
    q = jq.quantize({"w": w}, "w", kind=kind, double_quant=double_quant)["w"]
    got = np.asarray(jq.dequantize(q), np.float64)
    blocks = np.asarray(w, np.float64).reshape(32, 4, 64)
    exact = np.abs(blocks).max(-1, keepdims=True)
    used = np.asarray(jq._weight.absmax_of(q), np.float64)[..., None]
    half_gap = _codes.largest_gap(kind) / 2
    # Codes are chosen for the absmax dequantisation uses: half a gap of it, plus what a value
    # beyond a (double-quantised, smaller) absmax loses to clamping, plus float32 rounding.
    bound = half_gap * used + np.maximum(exact - used, 0) + 4e-7 * exact
    err = np.abs(got.reshape(32, 4, 64) - blocks)
    assert (err <= bound).all()
    if not double_quant:
        np.testing.assert_array_equal(used, exact.astype(np.float32))
    else:  # the 8-bit constants are close to the exact absmax
        assert np.abs(used - exact).max() <= np.abs(exact - exact.mean()).max() / 254 * 1.001


def test_int8_round_trip_within_absmax_over_254_per_channel():
    w = _weight((96, 40), seed=1)
    q = jq.quantize({"w": w}, "w", kind="int8")["w"]
    err = np.abs(np.asarray(jq.dequantize(q), np.float64) - np.asarray(w, np.float64))
    absmax = np.abs(np.asarray(w, np.float64)).max(0)
    assert (err <= absmax / 254 * (1 + 1e-6)).all()
    assert q.codes.dtype == jnp.int8 and q.scales.shape == (1, 40) and q.axes == (-2,)


def test_packing_puts_the_even_element_in_the_high_nibble():
    # One block whose values are exactly the 16 codes (absmax 1): indices 0..15 in order.
    w = jnp.asarray(np.tile(_codes.NF4_CODES, 4)[None, :])
    q = jq.quantize({"w": w}, "w", kind="nf4", double_quant=False)["w"]
    np.testing.assert_array_equal(np.asarray(q.codes[0, :8]), [1, 35, 69, 103, 137, 171, 205, 239])
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)), np.asarray(w))


def test_bytes_against_bfloat16():
    w = _weight((512, 512), seed=2, dtype=jnp.bfloat16)
    nf4 = jq.quantize({"w": w}, "w", kind="nf4")["w"]
    int8 = jq.quantize({"w": w}, "w", kind="int8")["w"]
    assert nf4.nbytes <= 0.27 * w.nbytes
    assert int8.nbytes <= 0.51 * w.nbytes
    assert jq.nbytes({"a": nf4, "b": int8}) == nf4.nbytes + int8.nbytes
    assert jq.dequantize(nf4).dtype == jnp.bfloat16


def test_a_pytree_with_static_metadata_compiles_once():
    w = _weight((8, 128), seed=3)
    q = jq.quantize({"w": w}, "w")["w"]
    assert len(jax.tree.leaves(q)) == 4
    traces = []

    @jax.jit
    def f(q):
        traces.append(1)
        return jq.dequantize(q)

    np.testing.assert_array_equal(f(q), jq.dequantize(q))
    f(jax.tree.map(lambda x: x + 0, q))
    assert len(traces) == 1
    assert jq.abstract({"w": q})["w"] == jax.ShapeDtypeStruct((8, 128), jnp.float32)


def test_untargeted_leaves_are_the_same_objects_and_config_layouts_pick_int8_axes():
    params = {"stack": _weight((3, 16, 8), seed=4), "bias": jnp.zeros(8)}
    config = jlora.LoraConfig(targets="stack", rank=1, layouts={"stack": "sio"})
    q = jq.quantize(params, config, kind="int8")
    assert q["bias"] is params["bias"]
    assert q["stack"].axes == (-2,) and q["stack"].reduced_axes == (1,) and q["stack"].scales.shape == (3, 1, 8)


def test_sharded_weight_keeps_its_spec_on_codes_and_scales():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    w = jax.device_put(_weight((64, 512), seed=5), NamedSharding(mesh, P("data", "model")))
    q = jq.quantize({"w": w}, "w")["w"]
    assert q.codes.sharding.spec == P("data", "model")
    assert q.scales.sharding.spec == P("data", None) or q.scales.shape[-1] % 4 == 0
    np.testing.assert_array_equal(jq.dequantize(q), jq.dequantize(jax.device_get(q)))
    q8 = jq.quantize({"w": w}, "w", kind="int8")["w"]
    assert q8.codes.sharding.spec == P("data", "model")


def test_orbax_round_trip_is_exact(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    q = jq.quantize({"w": _weight((4, 128), seed=6), "b": jnp.ones(3)}, "w")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "q", q)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "q", jax.tree.map(np.zeros_like, q))
    assert jax.tree.structure(restored) == jax.tree.structure(q)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(q), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype


def test_bad_input_names_the_path():
    params = {"dense": {"kernel": _weight((16, 40), seed=7), "bias": jnp.zeros(40)}}
    with pytest.raises(jlora.ConfigError, match=r"kind: got 'nf8'; expected one of"):
        jq.quantize(params, ".*kernel", kind="nf8")
    with pytest.raises(jlora.ConfigError, match=r"block_size: got 63; expected a positive even"):
        jq.quantize(params, ".*kernel", block_size=63)
    with pytest.raises(
        jlora.TargetError,
        match=r"dense/kernel: weight of shape \(16, 40\) has a last axis of 40, not a multiple of "
        r"block_size=64; .* \(e\.g\. 8\), quantise it as int8",
    ):
        jq.quantize(params, ".*kernel")
    with pytest.raises(jlora.TargetError, match=r"dense/bias: targeted a weight of shape \(40,\)"):
        jq.quantize(params, ".*bias", kind="int8")
    with pytest.raises(jlora.TargetError, match=r"dense/kernel: targeted a weight of dtype int32"):
        jq.quantize({"dense": {"kernel": jnp.ones((4, 4), jnp.int32)}}, ".*kernel", kind="int8")
    q = jq.quantize(params, ".*kernel", kind="int8")
    with pytest.raises(jlora.TargetError, match=r"params already hold quantised weights"):
        jq.quantize(q, ".*kernel", kind="int8")
