"""DoRA inside jlora.linen: identity at init, the float64 layer formula, merge, gradients, scan."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_linen import CNN, MLP, Decoder
from numerics import assert_within_roundoff, f64

import jlora
import jlora.linen
from jlora.variants import dora_magnitudes, dora_merge


def _perturbed(tree, seed, size):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    new = [x + size * jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return jax.tree.unflatten(treedef, new)


def _mlp(seed=0):
    model = MLP()
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((6, 10)), jnp.float32)
    params = model.init(jax.random.key(seed), x)["params"]
    adapted = jlora.linen.lora(model, jlora.LoraConfig(targets=".*kernel", rank=3, alpha=6.0))
    adapters = adapted.init_adapters(jax.random.key(seed + 1), params, x)
    return model, adapted, params, adapters, x


def _decoder(seed=0):
    model = Decoder()
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, 13, (2, 7)), jnp.int32)
    params = model.init(jax.random.key(seed), ids)["params"]
    config = jlora.LoraConfig(targets="layers/.*kernel", rank=2)
    adapted = jlora.linen.lora(model, config)
    adapters = adapted.init_adapters(jax.random.key(seed + 1), params, ids)
    return model, adapted, params, adapters, ids


def test_at_init_equals_the_base_exactly_in_the_same_program():
    model, adapted, params, adapters, x = _mlp()
    m = dora_magnitudes(params, adapters)
    y0 = model.apply({"params": params}, x)
    # Eager: the magnitudes and the layer's norms are the same operations, so m / ||W0||_c is
    # exactly 1, the correction exactly 0, and each layer returns its own output.
    np.testing.assert_array_equal(adapted.apply(params, adapters, x, magnitudes=m), y0)
    # Under jit the norms are another program: 1 to round-off, within a few roundings of y.
    got = jax.jit(lambda a, m: adapted.apply(params, a, x, magnitudes=m))(adapters, m)
    assert_within_roundoff(got, y0, np.abs(f64(y0)) + 1.0, terms=64)


def test_one_dense_layer_is_the_float64_formula():
    rng = np.random.default_rng(3)
    model = nn.Dense(7)
    x = jnp.asarray(rng.standard_normal((5, 9)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    params = {"kernel": params["kernel"], "bias": jnp.asarray(rng.standard_normal(7), jnp.float32)}
    adapted = jlora.linen.lora(model, jlora.LoraConfig(targets="kernel", rank=2, alpha=3.0))
    adapters = _perturbed(adapted.init_adapters(jax.random.key(1), params, x), 4, 0.3)
    m = {"kernel": jnp.asarray(rng.uniform(0.5, 2.0, 7), jnp.float32)}
    got = jax.jit(lambda a, m: adapted.apply(params, a, x, magnitudes=m))(adapters, m)
    f = adapters["kernel"]
    v = f64(params["kernel"]) + f.scale * f64(f.a) @ f64(f.b)
    norms = np.sqrt((v**2).sum(0))
    want = f64(x) @ v * (f64(m["kernel"]) / norms) + f64(params["bias"])
    ratio = f64(m["kernel"]) / norms
    magnitude = np.abs(f64(x)) @ np.abs(v) * ratio + np.abs(f64(params["bias"]))
    assert_within_roundoff(got, want, magnitude, terms=3 * 9 + 2 + 8)


@pytest.mark.parametrize(
    "build", [_mlp, pytest.param(_decoder, marks=pytest.mark.slow)], ids=["mlp", "scanned-decoder"]
)
def test_adapted_equals_the_dora_merged_model(build):
    model, adapted, params, adapters, x = build(1)
    adapters = _perturbed(adapters, 5, 0.2)
    m = _perturbed(dora_magnitudes(params, adapters), 6, 0.1)
    got = jax.jit(lambda a, m: adapted.apply(params, a, x, magnitudes=m))(adapters, m)
    want = jax.jit(lambda p: model.apply({"params": p}, x))(dora_merge(params, adapters, m))
    # Two float32 programs of the same network; 1e-5 of the output's scale is far below a missing
    # term or a wrong norm (each moves the output by its own size).
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


def test_gradients_reach_factors_and_magnitudes_as_in_the_merged_form():
    model, adapted, params, adapters, x = _mlp(2)
    adapters = _perturbed(adapters, 7, 0.2)
    m = dora_magnitudes(params, adapters)
    target = jnp.asarray(np.random.default_rng(8).standard_normal((6, 5)), jnp.float32)

    def factored(trained):
        a, m = trained
        return jnp.mean((adapted.apply(params, a, x, magnitudes=m) - target) ** 2)

    def merged(trained):
        a, m = trained
        return jnp.mean((model.apply({"params": dora_merge(params, a, m)}, x) - target) ** 2)

    got = jax.jit(jax.grad(factored))((adapters, m))
    want = jax.jit(jax.grad(merged))((adapters, m))
    for (path, g), h in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        scale = float(jnp.abs(h).max())
        assert scale > 0, path  # a, b and m of every layer get a gradient
        np.testing.assert_allclose(g, h, atol=1e-4 * scale, rtol=0, err_msg=str(path))


def test_dropout_keeps_the_identity_at_init():
    model, _, params, _, x = _mlp(3)
    config = jlora.LoraConfig(targets=".*kernel", rank=3, dropout=0.5)
    adapted = jlora.linen.lora(model, config)
    adapters = adapted.init_adapters(jax.random.key(4), params, x)
    m = dora_magnitudes(params, adapters)
    got = adapted.apply(
        params, adapters, x, magnitudes=m, lora_train=True, rngs={"dropout": jax.random.key(5)}
    )
    np.testing.assert_array_equal(got, model.apply({"params": params}, x))


def test_only_the_given_paths_are_dora():
    model, adapted, params, adapters, x = _mlp(4)
    adapters = _perturbed(adapters, 9, 0.2)
    m = dora_magnitudes(params, adapters)
    only_head = {"head": m["head"]}
    got = adapted.apply(params, adapters, x, magnitudes=only_head)
    # up and mid plain LoRA (merged additively), head DoRA.
    merged = jlora.merge(params, {k: v for k, v in adapters.items() if k != "head"})
    merged = dora_merge(merged, {"head": adapters["head"]}, only_head)
    np.testing.assert_allclose(got, model.apply({"params": merged}, x), atol=1e-5, rtol=0)


def test_errors_name_the_path():
    model, adapted, params, adapters, x = _mlp(5)
    m = dora_magnitudes(params, adapters)
    with pytest.raises(jlora.AdapterMismatchError, match=r"head/kernel: the DoRA magnitude has "):
        adapted.apply(params, adapters, x, magnitudes={**m, "head": {"kernel": jnp.ones(3)}})
    with pytest.raises(jlora.AdapterMismatchError, match=r"up/bias: there is a DoRA magnitude"):
        bad = {**m, "up": {**m["up"], "bias": m["up"]["kernel"]}}
        adapted.apply(params, adapters, x, magnitudes=bad)
    cnn = CNN()
    images = jnp.ones((2, 8, 8, 3))
    variables = cnn.init(jax.random.key(0), images)
    cnn_adapted = jlora.linen.lora(cnn, jlora.LoraConfig(targets=".*kernel", rank=2))
    cnn_adapters = cnn_adapted.init_adapters(
        jax.random.key(1), variables["params"], images,
        variables={"batch_stats": variables["batch_stats"]},
    )  # fmt: skip
    cnn_m = dora_magnitudes(variables["params"], cnn_adapters)
    with pytest.raises(jlora.AdapterMismatchError, match=r"conv1/kernel: DoRA .* nn\.Conv"):
        cnn_adapted.apply(
            variables["params"], cnn_adapters, images, magnitudes=cnn_m,
            variables={"batch_stats": variables["batch_stats"]},
        )  # fmt: skip


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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_train_step_forms_nothing_of_the_weights_shape(dropout):
    fan_in, fan_out = 24, 40
    model = nn.Dense(fan_out)
    x = jnp.ones((3, 7, fan_in))
    params = model.init(jax.random.key(0), x)["params"]
    adapted = jlora.linen.lora(model, jlora.LoraConfig("kernel", rank=4, dropout=dropout))
    adapters = adapted.init_adapters(jax.random.key(1), params, x)
    m = dora_magnitudes(params, adapters)

    def loss(trained, params, x):
        out = adapted.apply(params, trained[0], x, magnitudes=trained[1], lora_train=True,
                            rngs={"dropout": jax.random.key(2)})  # fmt: skip
        return jnp.sum(out**2)

    shapes = _shapes(jax.make_jaxpr(jax.grad(loss))((adapters, m), params, x).jaxpr)
    # The kernel enters as an input; no equation of the step outputs an array of its shape.
    assert [s for s in shapes if s in {(fan_in, fan_out), (fan_out, fan_in)}] == []


def test_densegeneral_with_batch_dims_is_refused_by_path():
    model = nn.DenseGeneral(features=5, axis=-1, batch_dims=0, name="per_head")
    x = jnp.ones((3, 4, 6))
    params = model.init(jax.random.key(0), x)["params"]
    adapted = jlora.linen.lora(model, jlora.LoraConfig("kernel", rank=2))
    adapters = adapted.init_adapters(jax.random.key(1), params, x)
    m = {"kernel": jnp.ones((3, 5))}
    with pytest.raises(jlora.AdapterMismatchError, match=r"kernel: DoRA .* batch_dims"):
        adapted.apply(params, adapters, x, magnitudes=m)


def test_summary_counts_the_magnitudes_by_hand():
    _, adapted, params, adapters, x = _mlp()  # x: 10 features; up 24, mid 24, head 5; rank 3
    m = dora_magnitudes(params, adapters)
    got = adapted.summary(params, adapters, x, magnitudes=m)
    rows = {r.path: (r.kind, r.params) for r in got.rows}
    # a (fan_in, 3) + b (3, fan_out) + m (fan_out,)
    assert rows == {
        "up/kernel": ("nn.Dense", 10 * 3 + 3 * 24 + 24),
        "mid/kernel": ("nn.Dense", 24 * 3 + 3 * 24 + 24),
        "head/kernel": ("nn.Dense", 24 * 3 + 3 * 5 + 5),
    }
    assert got.trainable_params == 126 + 168 + 92
    assert got.trainable_params == jlora.count_params(params, adapters, magnitudes=m).trainable
    assert adapted.summary(params, adapters, x).trainable_params == 126 + 168 + 92 - (24 + 24 + 5)
    with pytest.raises(jlora.AdapterMismatchError, match=r"head/bias: .* no factors"):
        adapted.summary(params, adapters, x, magnitudes={**m, "head": {"bias": jnp.ones(5)}})
