"""DoRA inside jlora.nnx: identity at init, merge, training with wrt=LoraParam, scanned stacks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models_nnx import CNN, MLP, ScannedDecoder
from numerics import assert_within_roundoff, f64

import jlora
import jlora.nnx
from jlora.variants import dora_merge, dora_nnx, nnx_magnitudes


def _perturb(model, seed, size):
    state = nnx.state(model, jlora.nnx.LoraParam)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda v: v + size * jnp.asarray(rng.standard_normal(v.shape)), state)
    nnx.update(model, state)


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _mlp(seed=0):
    model = MLP(nnx.Rngs(seed))
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((4, 10)), jnp.float32)
    return model, x


def _decoder(seed=0):
    model = ScannedDecoder(nnx.Rngs(seed))
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, 13, (2, 6)), jnp.int32)
    return model, ids


def _adapt(model, seed=1, **kw):
    config = jlora.LoraConfig(targets=".*kernel", rank=2, alpha=3.0, **kw)
    return dora_nnx(jlora.nnx.lora(model, config, rngs=nnx.Rngs(seed)))


@pytest.mark.parametrize(
    "build",
    # the scanned decoder's fast twin: test_adapted_equals_merged[scanned-decoder]
    [_mlp, pytest.param(_decoder, marks=pytest.mark.slow)],
    ids=["mlp", "scanned-decoder"],
)
def test_at_init_equals_the_base(build):
    model, x = build()
    y0 = model(x)
    _adapt(model)
    if build is _mlp:
        # Eager: the magnitudes and the layers' norms are the same operations, so m / ||W0||_c is
        # exactly 1 and each layer returns its own output. (nnx.scan compiles the stack's body:
        # another program, so the scanned decoder is 1 to round-off only.)
        np.testing.assert_array_equal(model(x), y0)
    got = nnx.jit(lambda m, x: m(x))(model, x)
    assert_within_roundoff(got, y0, np.abs(f64(y0)) + 1.0, terms=64)


@pytest.mark.parametrize("build", [_mlp, _decoder], ids=["mlp", "scanned-decoder"])
def test_adapted_equals_merged(build):
    model, x = build(1)
    _adapt(model)
    _perturb(model, 2, 0.1)
    got = nnx.jit(lambda m, x: m(x))(model, x)
    merged = jlora.nnx.merge(model)
    assert type(merged).__name__ == type(model).__name__ and not nnx.state(
        merged, jlora.nnx.LoraParam
    )
    want = nnx.jit(lambda m, x: m(x))(merged, x)
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
    # jlora.nnx.merge is the functional dora_merge of (to_adapters, nnx_magnitudes), bit for bit.
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    functional = _flat(dora_merge(params, jlora.nnx.to_adapters(model), nnx_magnitudes(model)))
    merged_params = _flat(nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
    assert set(functional) == set(merged_params)
    for key, w in functional.items():
        np.testing.assert_array_equal(merged_params[key], w, err_msg=key)


def test_optimizer_wrt_lora_param_trains_factors_and_magnitudes_only():
    model, x = _mlp(3)
    _adapt(model)
    _perturb(model, 4, 0.1)
    target = jnp.asarray(np.random.default_rng(5).standard_normal((4, 3)), jnp.float32)
    base = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, jlora.nnx.LoraParam)))
    with jax.numpy_dtype_promotion("standard"):
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=jlora.nnx.LoraParam)

    @nnx.jit
    def step(model, opt):
        diff = nnx.DiffState(0, jlora.nnx.LoraParam)
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2), argnums=diff)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            opt.update(model, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    after = nnx.to_pure_dict(nnx.state(model, jlora.nnx.LoraParam))
    for i in range(3):
        assert set(after["layers"][i]) == {"lora_a", "lora_b", "lora_magnitude"}
        for name in ("lora_a", "lora_b", "lora_magnitude"):
            assert not np.array_equal(after["layers"][i][name], before["layers"][i][name])
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)), base)


def test_dropout_keeps_the_identity_at_init():
    model, x = _mlp(6)
    y0 = model(x)
    _adapt(model, dropout=0.5)
    np.testing.assert_array_equal(model(x), y0)  # train mode: dropout on, ratio 1, b = 0


def test_errors_name_the_path():
    model, x = _mlp(7)
    with pytest.raises(jlora.TargetError, match=r"no adapted layers"):
        dora_nnx(model)
    jlora.nnx.lora(model, jlora.LoraConfig(targets=".*kernel", rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(jlora.TargetError, match=r"layers/9/kernel: dora_nnx: not an adapted"):
        dora_nnx(model, paths=["layers/9/kernel"])
    dora_nnx(model, paths=["layers/0/kernel"])
    with pytest.raises(jlora.TargetError, match=r"layers/0/kernel: the layer is DoRA already"):
        dora_nnx(model, paths=["layers/0/kernel"])
    assert list(nnx_magnitudes(model)["layers"]) == ["0"]
    cnn = CNN(nnx.Rngs(0))
    jlora.nnx.lora(cnn, jlora.LoraConfig(targets=".*kernel", rank=2), rngs=nnx.Rngs(1))
    with pytest.raises(jlora.TargetError, match=r"conv1/kernel: .* nnx\.Conv, but DoRA in jlora"):
        dora_nnx(cnn)


def test_dropout_follows_peft_the_base_product_of_the_dropped_input_too():
    rng = np.random.default_rng(8)
    layer = nnx.Linear(10, 6, rngs=nnx.Rngs(0))
    layer.bias.set_value(jnp.asarray(rng.standard_normal(6), jnp.float32))
    config = jlora.LoraConfig("kernel", rank=2, alpha=3.0, dropout=0.4)
    dora_nnx(jlora.nnx.lora(layer, config, rngs=nnx.Rngs(params=1, dropout=2)))
    _perturb(layer, 9, 0.3)
    x = jnp.asarray(rng.standard_normal((5, 10)), jnp.float32)
    key = nnx.clone(layer).lora_rngs()  # the key the call below draws
    got = layer(x)
    xd = f64(jlora.ops.dropout(x, 0.4, key))  # the dropped input, as the layer forms it
    w, bias, m = f64(layer.kernel[...]), f64(layer.bias[...]), f64(layer.lora_magnitude[...])
    a, b, s = f64(layer.lora_a[...]), f64(layer.lora_b[...]), config.scale_for("kernel")
    ratio = m / np.linalg.norm(w + s * a @ b, axis=0)
    # PEFT: result = x W0 + bias + (ratio - 1) (drop(x) W0) + ratio s (drop(x) a) b.
    want = f64(x) @ w + bias + (ratio - 1) * (xd @ w) + ratio * (s * (xd @ a) @ b)
    magnitude = np.abs(f64(x)) @ np.abs(w) + np.abs(bias) + (1 + ratio) * (
        np.abs(xd) @ np.abs(w) + s * (np.abs(xd) @ np.abs(a)) @ np.abs(b)
    )
    assert_within_roundoff(got, want, magnitude, terms=3 * 10 + 10)
    assert not np.allclose(xd, f64(x))  # the mask did drop entries


def test_summary_and_count_params_count_the_magnitudes():
    config = jlora.LoraConfig(targets=".*kernel", rank=2, alpha=3.0)
    plain = jlora.nnx.summary(jlora.nnx.lora(_mlp()[0], config, rngs=nnx.Rngs(1)))
    model, _ = _mlp()
    dora = _adapt(model)
    ms = {jax.tree_util.keystr(p, simple=True, separator="/"): m
          for p, m in jax.tree_util.tree_leaves_with_path(nnx_magnitudes(dora))}  # fmt: skip
    rows = {r.path: r.params for r in jlora.nnx.summary(dora).rows}
    assert set(rows) == set(ms) == {r.path for r in plain.rows}
    for row in plain.rows:  # a + b, plus one magnitude per output unit
        assert rows[row.path] == row.params + ms[row.path].size
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    adapters = jlora.nnx.to_adapters(dora)
    count = jlora.count_params(params, adapters, magnitudes=nnx_magnitudes(dora))
    extra = sum(m.size for m in ms.values())
    assert count.trainable == jlora.count_params(params, adapters).trainable + extra
    assert count.trainable == jlora.nnx.summary(dora).trainable_params
