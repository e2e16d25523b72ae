"""jlora.quant under jlora.nnx: quantize_nnx, and an adapted quantised model equals the dequantised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import jlora.nnx
import jlora.quant as jq


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 64, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _pair(kind):
    config = jlora.LoraConfig(targets=".*kernel", rank=4)
    quantized = jq.quantize_nnx(MLP(nnx.Rngs(0)), config, kind=kind)
    dense = MLP(nnx.Rngs(0))
    for name in ("l1", "l2"):
        q = getattr(quantized, name).kernel.get_value()
        assert isinstance(q, jq.QuantizedWeight) and q.kind == kind
        getattr(dense, name).kernel.set_value(jq.dequantize(q))
    rng = np.random.default_rng(1)
    for model in (quantized, dense):
        jlora.nnx.lora(model, config, rngs=nnx.Rngs(1))
        for name in ("l1", "l2"):
            b = getattr(model, name).lora_b
            b.set_value(
                jnp.asarray(np.random.default_rng(2).standard_normal(b.shape) * 0.1, b.dtype)
            )
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    return quantized, dense, x


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapted_quantised_model_equals_the_dequantised_model_and_trains(kind):
    quantized, dense, x = _pair(kind)
    np.testing.assert_allclose(quantized(x), dense(x), rtol=1e-5, atol=1e-5)

    def loss(model, x):
        return jnp.sum(model(x) ** 2)

    diff = nnx.DiffState(0, jlora.nnx.LoraParam)
    got = nnx.grad(loss, argnums=diff)(quantized, x)
    want = nnx.grad(loss, argnums=diff)(dense, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))

    @nnx.jit
    def step(model, x):
        grads = nnx.grad(loss, argnums=diff)(model, x)
        for name in ("l1", "l2"):
            layer, g = getattr(model, name), grads[name]
            layer.lora_a.set_value(layer.lora_a.get_value() - 1e-3 * g["lora_a"].get_value())
            layer.lora_b.set_value(layer.lora_b.get_value() - 1e-3 * g["lora_b"].get_value())
        return loss(model, x)

    before = float(loss(quantized, x))
    for _ in range(3):
        after = float(step(quantized, x))
    assert after < before
    assert isinstance(quantized.l1.kernel.get_value(), jq.QuantizedWeight)  # the base is frozen


def test_quantize_nnx_refuses_other_layers():
    class Lookup(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(16, 64, rngs=rngs)

    with pytest.raises(
        jlora.TargetError, match=r"embed/embedding: jlora.quant.quantize_nnx quantises nnx.Linear"
    ):
        jq.quantize_nnx(Lookup(nnx.Rngs(0)), ".*embedding", kind="int8")
