"""jlora.quant under jlora.nnx: quantize_nnx, and an adapted quantised model equals the dequantised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import assert_merge_within_roundoff

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


@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
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
    class Own(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.ones((16, 64)))

    with pytest.raises(
        jlora.TargetError,
        match=r"w: jlora.quant.quantize_nnx quantises the weights of nnx.Linear, "
        r"nnx.LinearGeneral, nnx.Einsum, nnx.Conv and nnx.Embed only",
    ):
        jq.quantize_nnx(Own(nnx.Rngs(0)), "w", kind="int8")


class Layers(nnx.Module):
    """An embedding (lookup and tied head), a conv and a Gemma-style einsum, split in blocks."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(256, 128, rngs=rngs)
        self.conv = nnx.Conv(128, 128, (3,), rngs=rngs)
        self.query = nnx.Einsum("BTD,NDH->BTNH", (2, 128, 64), (2, 64), rngs=rngs)

    def __call__(self, ids):
        h = self.query(self.conv(self.embed(ids)))
        return self.embed.attend(jnp.tanh(h.reshape(*h.shape[:2], 128)))


def _float_shapes(hlo, model):
    weights = [v for v in jax.tree.leaves(nnx.state(model, nnx.Param),
                                          is_leaf=lambda v: isinstance(v, jq.QuantizedWeight))
               if isinstance(v, jq.QuantizedWeight)]  # fmt: skip
    assert len(weights) == 3
    return [f"f32[{','.join(map(str, w.shape))}]" in hlo for w in weights]


# Slow: the block-wise kernels are the Linen ones, checked fast by tests/test_quant_layers.py and
# (no float copy in the step's HLO) tests/test_quant_product.py; this checks the NNX wrappers.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_embed_conv_einsum_over_quantised_weights_equal_the_dequantised(kind):
    config = jlora.LoraConfig(targets=[".*kernel", ".*embedding"], rank=3)
    quantized = jq.quantize_nnx(Layers(nnx.Rngs(0)), config, kind=kind)  # layouts from the layers
    dense = Layers(nnx.Rngs(0))
    for name, weight in [("embed", "embedding"), ("conv", "kernel"), ("query", "kernel")]:
        q = getattr(getattr(quantized, name), weight).get_value()
        assert isinstance(q, jq.QuantizedWeight)
        getattr(getattr(dense, name), weight).set_value(jq.dequantize(q))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5)))
    base = nnx.jit(lambda m: m(ids))(dense)
    for model in (quantized, dense):
        jlora.nnx.lora(model, config, rngs=nnx.Rngs(1))
    # b = 0: the adapted quantised model is the dequantised base, to round-off.
    np.testing.assert_allclose(nnx.jit(lambda m: m(ids))(quantized), base, rtol=1e-5, atol=1e-5)
    for model in (quantized, dense):
        for name in ("embed", "conv", "query"):
            b = getattr(model, name).lora_b
            noise = np.random.default_rng(2).standard_normal(b.shape) * 0.1
            b.set_value(jnp.asarray(noise, b.dtype))
    got, want = nnx.jit(lambda m: m(ids))(quantized), nnx.jit(lambda m: m(ids))(dense)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))

    def loss(model):
        return jnp.sum(model(ids) ** 2)

    diff = nnx.DiffState(0, jlora.nnx.LoraParam)
    grad = nnx.jit(nnx.grad(loss, argnums=diff))
    for g, w in zip(jax.tree.leaves(grad(quantized)), jax.tree.leaves(grad(dense)), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.abs(w).max()))
    graphdef, state = nnx.split(quantized)

    def pure(state):
        return loss(nnx.merge(graphdef, state))

    hlo = jax.jit(jax.grad(pure, allow_int=True)).lower(state).compile().as_text()
    assert not any(_float_shapes(hlo, quantized))  # no whole float weight in the step


class Stack(nnx.Module):
    """Three Linear layers stacked by nnx.vmap and run by nnx.scan."""

    def __init__(self, rngs):
        self.layers = nnx.split_rngs(splits=3)(
            nnx.vmap(lambda r: nnx.Linear(128, 128, rngs=r), in_axes=0, out_axes=0)
        )(rngs)

    def __call__(self, x):
        return nnx.scan(lambda x, layer: jnp.tanh(layer(x)), in_axes=(nnx.Carry, 0),
                        out_axes=nnx.Carry)(x, self.layers)  # fmt: skip


def test_vmap_stacked_weights_scan_slice_by_slice():
    config = jlora.LoraConfig(targets=".*kernel", rank=2)
    quantized = jq.quantize_nnx(Stack(nnx.Rngs(0)), config)
    q = quantized.layers.kernel.get_value()
    assert q.shape == (3, 128, 128) and q.stack_ndim == 1  # double quantised per layer
    dense = Stack(nnx.Rngs(0))
    dense.layers.kernel.set_value(jq.dequantize(q))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 128)), jnp.float32)
    for model in (quantized, dense):
        jlora.nnx.lora(model, config, rngs=nnx.Rngs(1))
        b = model.layers.lora_b
        b.set_value(jnp.asarray(np.random.default_rng(2).standard_normal(b.shape) * 0.1, b.dtype))
    np.testing.assert_allclose(nnx.jit(lambda m: m(x))(quantized), nnx.jit(lambda m: m(x))(dense),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_nnx_merge_of_a_quantised_model_is_jlora_quant_merge_in_the_weights_dtype():
    quantized, _, x = _pair("nf4")
    quantized.l2.lora_a.set_value(quantized.l2.lora_a.get_value() * 0)  # l2's delta: exactly 0
    qs = {n: getattr(quantized, n).kernel.get_value() for n in ("l1", "l2")}
    adapters = jlora.nnx.to_adapters(quantized)
    merged = jlora.nnx.merge(quantized)
    assert isinstance(quantized.l1.kernel.get_value(), jq.QuantizedWeight)  # copy=True
    want = jq.merge({n: {"kernel": q} for n, q in qs.items()}, adapters, dtype=jnp.float32)
    for name in ("l1", "l2"):
        got = getattr(merged, name).kernel.get_value()
        assert type(got) is type(want[name]["kernel"]) and got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want[name]["kernel"])  # the same rule, bit for bit
        base = jq.dequantize(qs[name], jnp.float32)
        assert_merge_within_roundoff(got, base, adapters[name]["kernel"], err_msg=name)
    np.testing.assert_array_equal(merged.l2.kernel.get_value(), jq.dequantize(qs["l2"]))
    assert type(merged.l1).__name__ == "Linear" and not hasattr(merged.l1, "lora_a")
    np.testing.assert_allclose(merged(x), quantized(x), rtol=1e-4, atol=1e-4)


def test_nnx_merge_of_a_quantised_bf16_layer_rounds_once_to_bf16():
    layer = nnx.Linear(64, 32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model = jq.quantize_nnx(layer, "kernel", kind="int8")
    model = jlora.nnx.lora(model, jlora.LoraConfig(targets="kernel", rank=2), rngs=1)
    b = np.random.default_rng(3).standard_normal((2, 32)) * 0.1
    model.lora_b.set_value(jnp.asarray(b, model.lora_b.get_value().dtype))
    q, adapters = model.kernel.get_value(), jlora.nnx.to_adapters(model)
    got = jlora.nnx.merge(model, copy=False).kernel.get_value()
    assert got.dtype == jnp.bfloat16 and model.kernel.get_value() is got
    want = jq.merge({"kernel": q}, adapters, dtype=jnp.bfloat16)["kernel"]
    np.testing.assert_array_equal(got, want)  # f32(dequantize(q)) + delta, one rounding
    assert not bool((got == jq.dequantize(q)).all())  # the delta is in it
