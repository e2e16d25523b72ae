"""Property tests of the invariants over random shapes, ranks, layouts and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_within_roundoff, delta_reference

import jlora
from jlora import LoraConfig

# Every new shape compiles: slow data generation is expected, not a problem. Data are drawn on the
# host (NumPy, ml_dtypes' bfloat16) and adapters' shapes come from jax.eval_shape, so each example
# compiles only the jlora programs under test.
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _host(values, dtype):
    """``values`` as a jax array of ``dtype``, rounded on the host (no program per shape)."""
    return jnp.asarray(np.asarray(values, np.float32).astype(dtype))


@st.composite
def cases(draw, dtypes=("float32", "bfloat16")):
    n_stack = draw(st.integers(0, 1))
    n_in = draw(st.integers(1, 2))
    n_out = draw(st.integers(1, 2))
    dims = st.integers(1, 6)
    shape = tuple(draw(dims) for _ in range(n_stack + n_in + n_out))
    layout = "s" * n_stack + "i" * n_in + "o" * n_out
    max_rank = min(np.prod(shape[n_stack : n_stack + n_in]), np.prod(shape[n_stack + n_in :]))
    rank = draw(st.integers(1, int(max_rank)))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = _host(rng.normal(size=shape), jnp.dtype(dtype))
    config = LoraConfig(
        targets="w",
        rank=rank,
        alpha=draw(st.floats(0.5, 32)),
        layouts={"w": layout},
        use_rslora=draw(st.booleans()),
    )
    shapes = jax.eval_shape(jlora.init, jax.random.key(seed), {"w": w}, config)
    trained = jax.tree.map(lambda x: _host(rng.normal(size=x.shape), x.dtype), shapes)
    return w, (seed, config), trained, layout


@SETTINGS
@given(cases())
def test_init_is_the_identity(case):
    w, (seed, config), _, _ = case
    adapters = jlora.init(jax.random.key(seed), {"w": w}, config)
    merged = jlora.merge({"w": w}, adapters)["w"]
    assert merged.dtype == w.dtype
    # Exact: b = 0 makes the delta an exact zero, and W0 + 0 rounds back to W0.
    np.testing.assert_array_equal(np.asarray(merged, np.float32), np.asarray(w, np.float32))


@SETTINGS
@given(cases())
def test_merge_rounds_once_and_unmerge_inverts(case):
    w, _, trained, _ = case
    d = jlora.delta(trained)["w"]
    merged = jlora.merge({"w": w}, trained)["w"]
    # Exact: the documented rule; merge runs these ops (delta, float32 add, round-to-nearest-even
    # cast), which NumPy (ml_dtypes for bfloat16) rounds identically on normal numbers.
    want = (np.asarray(w, np.float32) + np.asarray(d, np.float32)).astype(w.dtype)
    np.testing.assert_array_equal(merged, want)
    if w.dtype == jnp.float32:
        back = jlora.unmerge({"w": merged}, trained)["w"]
        # (W0 + d) - d with the same float32 d: two roundings of |W0| + |d| at most.
        magnitude = np.abs(np.asarray(w, np.float64)) + np.abs(np.asarray(d, np.float64))
        assert_within_roundoff(back, w, magnitude, terms=2)


@settings(SETTINGS, max_examples=4)  # float32 only: every example checks (6 drew ~3 float32)
@given(cases(dtypes=("float32",)))
def test_factored_equals_merged(case):
    w, _, trained, layout = case
    f = trained["w"]
    n_stack = layout.count("s")
    if n_stack:  # one layer's slice, as a scan body sees it (sliced on the host)
        w, f = jax.tree.map(lambda t: jnp.asarray(np.asarray(t)[0]), (w, f))
    n_in = layout.count("i")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, *w.shape[:n_in])).astype(np.float32))
    # One program for the layer (base product plus LoRA branch), as a model's forward compiles it.
    layer = jax.jit(lambda x, w, f: jnp.tensordot(x, w, n_in) + jlora.ops.dense_branch(x, f))
    factored = layer(x, w, f)
    merged_w = jlora.merge({"w": w}, {"w": f})["w"]
    # Both against x (W0 + scale a b) in float64: the factored output sums fan-in, then rank
    # terms; the merged weight's own round-off (rank + 2) passes through one more fan-in sum.
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    fan_in = int(np.prod(w.shape[:n_in]))
    want = np.tensordot(x64, w64 + delta_reference(f), n_in)
    magnitude = np.tensordot(np.abs(x64), np.abs(w64) + delta_reference(f, absolute=True), n_in)
    assert_within_roundoff(factored, want, magnitude, terms=fan_in + f.rank + 3)
    merged = np.tensordot(x64, np.asarray(merged_w, np.float64), n_in)
    assert_within_roundoff(merged, want, magnitude, terms=f.rank + 2)
