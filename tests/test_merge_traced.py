"""`merge`/`unmerge` in every call form: eager, jit, params closed over, grad without jit, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

CONFIG = jlora.LoraConfig(targets=".*kernel", rank=2, alpha=2.0)


def _setup(seed: int):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
        "bias": jnp.zeros(4, jnp.float32),
    }
    adapters = jlora.init(jax.random.key(seed), params, CONFIG)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), adapters)
    return params, adapters


def _reference(params, adapters, sign=1.0) -> np.ndarray:
    f = adapters["dense"]["kernel"]
    d = f.scale * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
    return np.asarray(params["dense"]["kernel"], np.float64) + sign * d


def _tol(adapters) -> float:
    # One float32 rounding of each of the <= 3 terms (w, the rank-2 product, the sum).
    f = adapters["dense"]["kernel"]
    mags = np.abs(np.asarray(f.a, np.float64)) @ np.abs(np.asarray(f.b, np.float64))
    return 8 * np.finfo(np.float32).eps * (f.scale * mags.max() + 4.0)


@pytest.mark.parametrize("fn", [jlora.merge, jlora.unmerge])
def test_params_closed_over_under_jit(fn):
    params, adapters = _setup(0)
    got = jax.jit(lambda f: fn(params, f))(adapters)
    sign = 1.0 if fn is jlora.merge else -1.0
    want = _reference(params, adapters, sign)
    np.testing.assert_allclose(got["dense"]["kernel"], want, rtol=0, atol=_tol(adapters))
    assert got["bias"] is params["bias"] or np.array_equal(got["bias"], params["bias"])


def test_grad_without_jit_matches_the_float64_gradient():
    params, adapters = _setup(1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 6)), jnp.float32)

    def loss(f):
        return jnp.sum(x @ jlora.merge(params, f)["dense"]["kernel"])

    g = jax.grad(loss)(adapters)["dense"]["kernel"]
    f = adapters["dense"]["kernel"]
    # d/da sum(x (W + s a b)) = s x^T 1 b^T, d/db = s a^T x^T 1
    col = np.asarray(x, np.float64).sum(0)[:, None] @ np.ones((1, 4))
    want_a = f.scale * col @ np.asarray(f.b, np.float64).T
    want_b = f.scale * np.asarray(f.a, np.float64).T @ col
    np.testing.assert_allclose(g.a, want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.b, want_b, rtol=1e-5, atol=1e-5)


def test_vmap_over_a_batch_of_adapters():
    params, adapters = _setup(3)
    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), adapters)
    got = jax.vmap(lambda f: jlora.merge(params, f)["dense"]["kernel"])(batch)
    for i in range(3):
        one = jax.tree.map(lambda x, i=i: x[i], batch)
        np.testing.assert_allclose(got[i], _reference(params, one), rtol=0, atol=_tol(one))


def test_jit_of_both_and_eager_keep_the_base_sharding():
    params, adapters = _setup(4)
    eager = jlora.merge(params, adapters)["dense"]["kernel"]
    jitted = jax.jit(jlora.merge)(params, adapters)["dense"]["kernel"]
    want = _reference(params, adapters)
    for got in (eager, jitted):
        np.testing.assert_allclose(got, want, rtol=0, atol=_tol(adapters))
    assert eager.sharding == params["dense"]["kernel"].sharding
