"""jlora.quant under jlora.linen (factored LoRA over a quantised base) and jlora.quant.merge."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.linen
import jlora.quant as jq
from tests.numerics import assert_within_roundoff


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(128)(x))
        return nn.Dense(64)(x)


def _setup(kind, seed):
    model = MLP()
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    params = model.init(jax.random.key(seed), x)["params"]
    config = jlora.LoraConfig(targets=".*kernel", rank=4)
    qparams = jq.quantize(params, config, kind=kind)
    adapted = jlora.linen.lora(model, config)
    adapters = adapted.init_adapters(jax.random.key(1), jq.abstract(qparams), x)
    adapters = jax.tree.map(
        lambda t: t + jnp.asarray(rng.standard_normal(t.shape) * 0.1, t.dtype), adapters
    )
    return model, adapted, x, params, qparams, adapters


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_base_equals_dequantised_base(kind):
    _, adapted, x, _, qparams, adapters = _setup(kind, seed=0)
    dequantized = jq.dequantize(qparams)
    apply = jax.jit(adapted.apply)
    got, want = apply(qparams, adapters, x), apply(dequantized, adapters, x)
    assert_within_roundoff(got, want, np.abs(np.asarray(want)) + 1.0, terms=128)

    def loss(a, p):
        return jnp.sum(adapted.apply(p, a, x) ** 2)

    g_q = jax.jit(jax.grad(loss))(adapters, qparams)
    g_f = jax.jit(jax.grad(loss))(adapters, dequantized)
    assert jax.tree.structure(g_q) == jax.tree.structure(adapters)  # factors only
    for a, b in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_f), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    # remat recomputes the dequantised weights; same values.
    g_r = jax.jit(jax.grad(jq.remat(loss)))(adapters, qparams)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_q), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_init_adapters_on_quantised_params_matches_float_params():
    _, adapted, x, params, qparams, _ = _setup("nf4", seed=1)
    from_q = adapted.init_adapters(jax.random.key(1), qparams, x)
    from_f = adapted.init_adapters(jax.random.key(1), params, x)
    for a, b in zip(jax.tree.leaves(from_q), jax.tree.leaves(from_f), strict=True):
        np.testing.assert_array_equal(a, b)


def test_merge_is_float_merge_of_the_dequantised_base_and_requantize_reports():
    model, adapted, x, _, qparams, adapters = _setup("nf4", seed=2)
    for dtype in (jnp.float32, jnp.bfloat16):
        merged = jq.merge(qparams, adapters, dtype=dtype)
        want = jlora.merge(jq.dequantize(qparams, jnp.float32), adapters)
        for path in ("Dense_0", "Dense_1"):
            assert merged[path]["kernel"].dtype == dtype
            np.testing.assert_array_equal(
                merged[path]["kernel"], want[path]["kernel"].astype(dtype)
            )
            assert merged[path]["bias"] is qparams[path]["bias"]
    merged = jq.merge(qparams, adapters, dtype=jnp.float32)
    y = adapted.apply(qparams, adapters, x)
    np.testing.assert_allclose(model.apply({"params": merged}, x), y, rtol=1e-4, atol=1e-4)
    requantized, report = jq.merge(qparams, adapters, dtype=jnp.float32, requantize=True)
    assert set(report) == {"Dense_0/kernel", "Dense_1/kernel"}
    for path, err in report.items():
        q = requantized[path.split("/")[0]]["kernel"]
        assert isinstance(q, jq.QuantizedWeight) and q.kind == "nf4" and q.double_quant
        diff = np.abs(
            np.asarray(jq.dequantize(q)) - np.asarray(merged[path.split("/")[0]]["kernel"])
        )
        assert err.max_abs == pytest.approx(float(diff.max()), rel=1e-6)
        assert 0 < err.relative_rms < 0.15


def test_merge_errors_name_the_path():
    _, _, _, _, qparams, adapters = _setup("int8", seed=3)
    with pytest.raises(jlora.AdapterMismatchError, match=r"jlora\.quant\.merge\(qparams, adapters"):
        jlora.merge(qparams, adapters)
    other = jlora.init(
        jax.random.key(0),
        {"Dense_0": {"kernel": jnp.ones((32, 128))}},
        jlora.LoraConfig(targets=".*kernel", rank=2),
    )
    with pytest.raises(
        jlora.AdapterMismatchError,
        match=r"Dense_0/kernel: adapter factors a \(32, 2\), b \(2, 128\) do not fit the weight of "
        r"shape \(64, 128\)",
    ):
        jq.merge(qparams, other)
    with pytest.raises(
        jlora.AdapterMismatchError, match=r"Dense_9/kernel: the adapters have factors"
    ):
        jq.merge(qparams, {**adapters, "Dense_9": adapters["Dense_0"]})
