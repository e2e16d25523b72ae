"""Property tests of the invariants over random shapes, ranks, layouts and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora
from jlora import LoraConfig

# Every new shape compiles: slow data generation is expected, not a problem.
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    n_stack = draw(st.integers(0, 1))
    n_in = draw(st.integers(1, 2))
    n_out = draw(st.integers(1, 2))
    dims = st.integers(1, 6)
    shape = tuple(draw(dims) for _ in range(n_stack + n_in + n_out))
    layout = "s" * n_stack + "i" * n_in + "o" * n_out
    max_rank = min(np.prod(shape[n_stack : n_stack + n_in]), np.prod(shape[n_stack + n_in :]))
    rank = draw(st.integers(1, int(max_rank)))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=shape).astype(np.float32), dtype)
    config = LoraConfig(
        targets="w",
        rank=rank,
        alpha=draw(st.floats(0.5, 32)),
        layouts={"w": layout},
        use_rslora=draw(st.booleans()),
    )
    adapters = jlora.init(jax.random.key(seed), {"w": w}, config)
    trained = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), adapters)
    return w, adapters, trained, layout


@SETTINGS
@given(cases())
def test_init_is_the_identity(case):
    w, adapters, _, _ = case
    merged = jlora.merge({"w": w}, adapters)["w"]
    assert merged.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(merged, np.float32), np.asarray(w, np.float32))


@SETTINGS
@given(cases())
def test_merge_rounds_once_and_unmerge_inverts(case):
    w, _, trained, _ = case
    d = jlora.delta(trained)["w"]
    merged = jlora.merge({"w": w}, trained)["w"]
    np.testing.assert_array_equal(merged, (w.astype(jnp.float32) + d).astype(w.dtype))
    if w.dtype == jnp.float32:
        back = jlora.unmerge({"w": merged}, trained)["w"]
        tol = 4 * np.finfo(np.float32).eps * (1 + np.max(np.abs(np.asarray(d))))
        np.testing.assert_allclose(back, w, rtol=0, atol=tol)


@SETTINGS
@given(cases())
def test_factored_equals_merged(case):
    w, _, trained, layout = case
    if w.dtype != jnp.float32:
        return
    f = trained["w"]
    n_stack = layout.count("s")
    if n_stack:  # one layer's slice, as a scan body sees it
        w, f = w[0], jax.tree.map(lambda t: t[0], f)
    n_in = layout.count("i")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, *w.shape[:n_in])).astype(np.float32))
    factored = jnp.tensordot(x, w, n_in) + jlora.ops.dense_branch(x, f)
    merged_w = jlora.merge({"w": w}, {"w": f})["w"]
    x64 = np.asarray(x, np.float64)
    expected = np.tensordot(x64, np.asarray(merged_w, np.float64), n_in)
    scale = 1 + np.max(np.abs(expected))
    np.testing.assert_allclose(factored, expected, rtol=0, atol=1e-5 * scale)
