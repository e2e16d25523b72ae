"""DoRA: the factored layer against the materialised formula, its jaxpr, gradients, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import EPS32, assert_within_roundoff, f64

import jlora
from jlora.variants import dora_dense, dora_magnitudes, dora_merge, dora_unmerge

FAN_IN, FAN_OUT, RANK, ROWS = 24, 40, 4, 8  # all distinct, so shapes identify arrays


def _layer(seed, fan_out=(FAN_OUT,)):
    rng = np.random.default_rng(seed)
    w0 = jnp.asarray(rng.standard_normal((FAN_IN, *fan_out)), jnp.float32)
    layout = jlora.Layout(1, len(fan_out))
    f = jlora.LoraFactors(
        jnp.asarray(rng.standard_normal((FAN_IN, RANK)) / 5, jnp.float32),
        jnp.asarray(rng.standard_normal((RANK, *fan_out)) / 5, jnp.float32),
        0.75,
        layout,
    )
    m = jnp.asarray(rng.uniform(0.5, 2.0, fan_out), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, ROWS // 2, FAN_IN)), jnp.float32)
    return x, w0, f, m


def _reference(x, w0, f, m):
    """float64: ``x (m V / ||V||_c)`` with ``V`` formed, and the magnitude behind each output."""
    w = f64(w0).reshape(FAN_IN, -1)
    v = w + f.scale * f64(f.a) @ f64(f.b).reshape(RANK, -1)
    norms = np.sqrt((v * v).sum(0))
    rows = f64(x).reshape(-1, FAN_IN)
    out = rows @ (v * (f64(m).reshape(-1) / norms))
    magnitude = np.abs(rows) @ (
        np.abs(w) + abs(f.scale) * np.abs(f64(f.a)) @ np.abs(f64(f.b)).reshape(RANK, -1)
    )
    magnitude = magnitude * np.abs(f64(m).reshape(-1) / norms)
    shape = (*x.shape[:-1], *w0.shape[1:])
    return out.reshape(shape), magnitude.reshape(shape)


@pytest.mark.parametrize("fan_out", [(FAN_OUT,), (5, 8)])
def test_equals_the_materialised_formula(fan_out):
    x, w0, f, m = _layer(0, fan_out)
    got = jax.jit(dora_dense)(x, w0, f, m)
    want, magnitude = _reference(x, w0, f, m)
    # Sums over fan_in and rank, plus the norms' relative round-off (a sum over fan_in, sqrt,
    # divide) carried into every element.
    assert_within_roundoff(got, want, magnitude, terms=3 * FAN_IN + RANK + 8)


def test_at_init_equals_the_base():
    x, w0, f, _ = _layer(1)
    f = jlora.init(jax.random.key(0), {"w": w0}, jlora.LoraConfig("w", rank=RANK))["w"]
    m = dora_magnitudes({"w": w0}, {"w": f})["w"]
    np.testing.assert_allclose(f64(m), np.sqrt((f64(w0) ** 2).sum(0)), rtol=4 * FAN_IN * EPS32)
    got = jax.jit(dora_dense)(x, w0, f, m)
    rows = f64(x).reshape(-1, FAN_IN)
    want = (rows @ f64(w0)).reshape(got.shape)
    magnitude = (np.abs(rows) @ np.abs(f64(w0))).reshape(got.shape)
    # m / ||V||_c is 1 to round-off: m comes from the same expansion, in another program.
    assert_within_roundoff(got, want, magnitude, terms=FAN_IN + 4)


def _shapes(jaxpr):
    """Every intermediate array's shape in a jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out += _shapes(getattr(inner, "jaxpr", inner))
    return out


@pytest.mark.parametrize("detach_norm", [False, True])
def test_train_step_forms_nothing_of_the_weights_shape(detach_norm):
    x, w0, f, m = _layer(2)
    y = jnp.ones((2, ROWS // 2, FAN_OUT))

    def dora_loss(f, m, w0, x):
        return jnp.mean((dora_dense(x, w0, f, m, detach_norm=detach_norm) - y) ** 2)

    def lora_loss(f, w0, x):
        return jnp.mean((x @ w0 + jlora.ops.dense_branch(x, f) - y) ** 2)

    weight_like = {(FAN_IN, FAN_OUT), (FAN_OUT, FAN_IN)}
    dora = _shapes(jax.make_jaxpr(jax.grad(dora_loss, argnums=(0, 1)))(f, m, w0, x).jaxpr)
    lora = _shapes(jax.make_jaxpr(jax.grad(lora_loss))(f, w0, x).jaxpr)
    # W0 enters as an input; no equation of either step outputs an array of its shape.
    assert [s for s in lora if s in weight_like] == []
    assert [s for s in dora if s in weight_like] == []


@pytest.mark.parametrize("detach_norm", [False, True])
def test_gradients_match_autodiff_of_the_materialised_form(detach_norm):
    x, w0, f, m = _layer(3)
    y = jnp.asarray(np.random.default_rng(4).standard_normal((2, ROWS // 2, FAN_OUT)), jnp.float32)

    def materialised(f, m):
        v = w0 + jlora.delta({"w": f})["w"]
        norms = jnp.sqrt(jnp.sum(v * v, axis=0))
        if detach_norm:
            norms = jax.lax.stop_gradient(norms)
        return jnp.mean((x @ (v * (m / norms)[None]) - y) ** 2)

    def factored(f, m):
        return jnp.mean((dora_dense(x, w0, f, m, detach_norm=detach_norm) - y) ** 2)

    got = jax.jit(jax.grad(factored, argnums=(0, 1)))(f, m)
    want = jax.jit(jax.grad(materialised, argnums=(0, 1)))(f, m)
    # Two float32 programs of the same maths (no float64 autodiff here): within 1e-5 of each
    # gradient's scale, far below a missing term (which moves it by its own size).
    for g, h, name in zip(
        (got[0].a, got[0].b, got[1]), (want[0].a, want[0].b, want[1]), "abm", strict=True
    ):
        np.testing.assert_allclose(
            f64(g), f64(h), atol=1e-5 * float(np.abs(f64(h)).max()), err_msg=name
        )
    if detach_norm:  # detaching changes the gradient (by far more than the tolerance)
        full = jax.jit(jax.grad(lambda f: jnp.mean((dora_dense(x, w0, f, m) - y) ** 2)))(f)
        assert float(jnp.abs(full.a - got[0].a).max()) > 1e-3 * float(jnp.abs(full.a).max())


def test_merge_and_unmerge():
    rng = np.random.default_rng(5)
    stacked = jnp.asarray(rng.standard_normal((3, 6, 10)), jnp.float32)  # a scanned (L, in, out)
    params = {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)},
        "stack": stacked,
        "bias": jnp.zeros(10),
    }
    config = jlora.LoraConfig(targets=("dense/kernel", "stack"), rank=2, layouts={"stack": "sio"})
    adapters = jlora.init(jax.random.key(0), params, config)
    adapters = jax.tree.map(lambda t: t + 0.3 * jnp.ones_like(t), adapters)
    norms = dora_magnitudes(params, adapters)
    magnitudes = jax.tree.map(lambda n: 1.5 * n + 0.1, norms)
    merged = dora_merge(params, adapters, magnitudes)
    assert merged["bias"] is params["bias"]
    for path, w in (("dense/kernel", params["dense"]["kernel"]), ("stack", stacked)):
        f = adapters["dense"]["kernel"] if path == "dense/kernel" else adapters["stack"]
        m = magnitudes["dense"]["kernel"] if path == "dense/kernel" else magnitudes["stack"]
        v = f64(w) + f.scale * f64(f.a) @ f64(f.b)
        norms64 = np.sqrt((v * v).sum(-2, keepdims=True))
        want = v * f64(m)[..., None, :] / norms64
        got = merged["dense"]["kernel"] if path == "dense/kernel" else merged["stack"]
        np.testing.assert_allclose(
            f64(got), want, rtol=8 * 6 * EPS32, atol=8 * 6 * EPS32, err_msg=path
        )
    # The merged weight is the factored layer's.
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    np.testing.assert_allclose(
        f64(x @ merged["dense"]["kernel"]),
        f64(
            dora_dense(
                x,
                params["dense"]["kernel"],
                adapters["dense"]["kernel"],
                magnitudes["dense"]["kernel"],
            )
        ),
        rtol=1e-5,
        atol=1e-5,
    )
    back = dora_unmerge(merged, adapters, magnitudes, norms)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(f64(got), f64(want), atol=64 * EPS32 * 4)


def test_errors():
    x, w0, f, m = _layer(6)
    with pytest.raises(jlora.AdapterMismatchError, match=r"dora_dense: magnitude has shape \(3,\)"):
        dora_dense(x, w0, f, jnp.ones(3))
    with pytest.raises(jlora.AdapterMismatchError, match="no stack axes"):
        dora_dense(x, w0[None], f, m)
    with pytest.raises(jlora.AdapterMismatchError, match=r"^w: dora_merge: expected a magnitude"):
        dora_merge({"w": w0}, {"w": f}, {"v": m})
    with pytest.raises(jlora.AdapterMismatchError, match=r"^w: dora_unmerge: expected norms"):
        dora_unmerge({"w": w0}, {"w": f}, {"w": m}, {})
    emb = {"embedding": jnp.ones((10, 4))}
    adapters = jlora.init(jax.random.key(0), emb, jlora.LoraConfig("embedding", rank=2))
    with pytest.raises(jlora.AdapterMismatchError, match=r"^embedding: dora_magnitudes: DoRA"):
        dora_magnitudes(emb, adapters)
