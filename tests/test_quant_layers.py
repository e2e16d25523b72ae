"""jlora.quant under jlora.linen for nn.Einsum, nn.Conv, nn.Embed (lookup, attend) and nn.scan:
the adapted quantised layer equals the adapted dequantised one, trains only the factors, and its
step holds no float copy of the whole weight."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.linen
import jlora.quant as jq
from tests.numerics import assert_within_roundoff


def _normal(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


class Halved(nn.Embed):  # a subclass whose override calls the kind's own method
    def attend(self, query):
        return super().attend(query) * 0.5


class Tied(nn.Module):  # an embedding used as lookup and as output head
    @nn.compact
    def __call__(self, ids):
        embed = Halved(256, 64, name="Embed_0")
        return embed.attend(jnp.tanh(embed(ids)))


LAYERS = {  # name: (module, input, fan-in summed per output element, kernel split in blocks)
    "conv": (nn.Conv(64, (3,)), (2, 6, 128), 3 * 128),
    "einsum-oio": (nn.Einsum((2, 128, 64), "BTD,NDH->BTNH"), (2, 3, 128), 128),
    "einsum-iio-ellipsis": (nn.Einsum((2, 128, 64), "...NH,NHD->...D"), (2, 3, 2, 128), 256),
    "einsum-gemma-kv": (nn.Einsum((2, 2, 128, 64), "BTD,CKDH->CBTKH"), (2, 3, 128), 128),
    "einsum-shared": (nn.Einsum((128, 8, 64), "BNH,NHK->BNK", use_bias=False), (2, 128, 8), 8),
    "embed": (Tied(), (2, 5), 64),
}


def _plus_noise(t, seed):
    """``t + 0.1 N(0, 1)``, added in NumPy (no eager program per shape)."""
    return jnp.asarray(np.asarray(t) + np.asarray(_normal(t.shape, seed, 0.1)))


def _setup(name, kind, seed):
    module, shape, _ = LAYERS[name]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, 256, shape)) if name == "embed" else _normal(shape, seed)
    # Compiled inits (eagerly, each op compiles a program of its own); the noise added in NumPy.
    params = jax.jit(module.init)(jax.random.key(seed), x)["params"]
    params = jax.tree.map(lambda p: _plus_noise(p, seed + 1), params)  # biases too
    config = jlora.LoraConfig(targets=[".*embedding" if name == "embed" else ".*kernel"], rank=3)
    layouts = jlora.linen.lora(module, config).infer_layouts(params, x)
    config = dataclasses.replace(config, layouts=tuple(layouts.items()))
    qparams = jq.quantize(params, config, kind=kind)
    adapted = jlora.linen.lora(module, config)
    zero_b = jax.jit(adapted.init_adapters)(jax.random.key(1), jq.abstract(qparams), x)
    adapters = jax.tree.map(lambda t: _plus_noise(t, seed + 2), zero_b)
    return adapted, x, qparams, zero_b, adapters


def _full_weights(qparams):
    return [q for q in jax.tree.leaves(qparams, is_leaf=lambda q: isinstance(q, jq.QuantizedWeight))
            if isinstance(q, jq.QuantizedWeight)]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kind"),
    [("conv", "nf4"), pytest.param("conv", "int8", marks=pytest.mark.slow), ("einsum-oio", "nf4"),
     ("einsum-iio-ellipsis", "int8"), ("einsum-gemma-kv", "nf4"), ("einsum-shared", "nf4"), ("embed", "nf4"),
     pytest.param("embed", "int8", marks=pytest.mark.slow)],
)  # fmt: skip
def test_adapted_quantised_layer_equals_the_dequantised_layer(name, kind):
    adapted, x, qparams, zero_b, adapters = _setup(name, kind, seed=0)
    dequantized = jax.jit(jq.dequantize)(qparams)
    apply = jax.jit(adapted.apply)
    got, want = apply(qparams, adapters, x), apply(dequantized, adapters, x)
    # Both float32, summed in other orders: the magnitude is the layer run on |x|, |W|, |a|, |b|.
    absolute = jax.tree.map(jnp.abs, (dequantized, adapters))
    # (For the tied embedding tanh is monotone, so tanh(|rows|) bounds |tanh(rows)|.)
    magnitude = apply(*absolute, x if name == "embed" else jnp.abs(x))
    assert_within_roundoff(got, want, magnitude, terms=2 * (LAYERS[name][2] + 5))
    # b = 0: the adapted layer is the quantised base layer (the lookup is bit-exact).
    base = apply(qparams, zero_b, x)
    plain = jax.jit(adapted.model.apply)({"params": dequantized}, x)
    assert_within_roundoff(base, plain, magnitude, terms=2 * (LAYERS[name][2] + 5))

    def loss(a, p):
        return jnp.sum(adapted.apply(p, a, x) ** 2)

    step = jax.jit(jax.grad(loss))
    g_q, g_f = step(adapters, qparams), step(adapters, dequantized)
    assert jax.tree.structure(g_q) == jax.tree.structure(adapters)  # the factors only
    for a, b in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_f), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))
    # No float array of a whole weight's shape in the compiled step (XLA drops nn.Embed's
    # unused setup dequantisation).
    hlo = step.lower(adapters, qparams).compile().as_text()
    for q in _full_weights(qparams):
        assert f"f32[{','.join(map(str, q.shape))}]" not in hlo
    # merge: the dequantised base plus the delta.
    merged, float_merged = jax.jit(lambda q, a: (
        jq.merge(q, a, dtype=jnp.float32), jlora.merge(jq.dequantize(q, jnp.float32), a)
    ))(qparams, adapters)  # fmt: skip
    for got_w, want_w in zip(jax.tree.leaves(merged), jax.tree.leaves(float_merged), strict=True):
        np.testing.assert_array_equal(got_w, want_w)


def test_embedding_lookup_gathers_exactly_the_dequantised_rows():
    q = jq.quantize({"e": _normal((300, 128), 0)}, "e", kind="nf4")["e"]  # 3 blocks of constants
    # One compiled lookup and one compiled dequantisation (eagerly, each op compiles alone). The
    # last row of ids is out of the ordinary: as jnp.take on the float table, -1 is the last row,
    # 300 and -301 are NaN rows.
    ids = jnp.array([[0, 299, 150], [7, 7, 2], [-1, 300, -301]])
    got = np.asarray(jax.jit(jq._gather.lookup, static_argnums=2)(q, ids, jnp.float32))
    table = jax.jit(jq.dequantize)(q)
    np.testing.assert_array_equal(got[:2], np.asarray(table)[np.asarray(ids[:2])])
    np.testing.assert_array_equal(got[2], jnp.take(table, ids[2], 0))
    assert np.isnan(got[2, 1:]).all()


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(128)(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_scan_slices_are_the_quantised_slices_and_train(kind):
    model, x = Stack(), _normal((4, 128), 0)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    config = jlora.LoraConfig(targets=".*kernel", rank=2, layouts={".*kernel": "sio"})
    qparams = jq.quantize(params, config, kind=kind)
    stacked = qparams["layers"]["Dense_0"]["kernel"]
    kernel = np.asarray(params["layers"]["Dense_0"]["kernel"])  # sliced in NumPy, not op by op
    for i in range(3):  # each slice is that slice quantised alone, bit for bit
        alone = jq.quantize({"k": jnp.asarray(kernel[i])}, "k", kind=kind)["k"]
        sliced = jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked)
        assert jax.tree.structure(sliced) == jax.tree.structure(alone)
        for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(alone), strict=True):
            np.testing.assert_array_equal(a, b)
    adapted = jlora.linen.lora(model, config)
    # Compiled init and dequantisation: eagerly each op would compile a program of its own.
    adapters = jax.jit(adapted.init_adapters)(jax.random.key(1), jq.abstract(qparams), x)
    adapters = jax.tree.map(lambda t: _plus_noise(t, 2), adapters)
    got = jax.jit(adapted.apply)(qparams, adapters, x)
    want = jax.jit(adapted.apply)(jax.jit(jq.dequantize)(qparams), adapters, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A few Adam steps: the loss falls, the quantised base is untouched.
    opt = optax.adam(1e-2)
    loss = lambda a, p: jnp.sum((adapted.apply(p, a, x) - 0.5) ** 2)  # noqa: E731

    @jax.jit
    def step(a, s, p):
        value, g = jax.value_and_grad(loss)(a, p)
        updates, s = opt.update(g, s, a)
        return optax.apply_updates(a, updates), s, value

    before = jax.tree.map(np.asarray, qparams)
    state, values = opt.init(adapters), []
    for _ in range(4):  # the 4th step's loss is the loss after 3 steps
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
            adapters, state, value = step(adapters, state, qparams)
        values.append(float(value))
    assert values[-1] < values[0]
    for a, b in zip(jax.tree.leaves(qparams), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_slice_along_a_non_stack_axis_is_refused():
    w, config = _normal((3, 64, 64), 0), jlora.LoraConfig(targets="k", rank=1, layouts={"k": "iio"})
    q = jq.quantize({"k": w}, config, kind="nf4")  # no 's': double quantisation over the whole
    with pytest.raises(
        jlora.AdapterMismatchError,
        match=r"cannot be sliced along axis 0 \(nn\.scan / nn\.vmap\): its double-quantisation "
        r"constants are blocked per slice of its first 0 axes",
    ):
        q["k"].remove_axis(0, {})
    q8 = jq.quantize({"k": w}, config, kind="int8")["k"]
    with pytest.raises(jlora.AdapterMismatchError, match=r"axis 0 is one of the fan-in axes"):
        q8.remove_axis(0, {})
