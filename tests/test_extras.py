"""Trainable extras (``LoraConfig.trainable``, PEFT's ``modules_to_save``) across jlora."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

import jlora
import jlora.linen
import jlora.nnx
import jlora.sharding
from jlora import (
    AdapterMismatchError,
    ConfigError,
    LoraConfig,
    NotAnArrayError,
    TargetError,
    Trainable,
    checkpoint,
)
from jlora import peft as jpeft
from jlora.optim import freeze_base, labels, lora_plus, mask

standard_promotion = jax.numpy_dtype_promotion("standard")  # optax mixes int32 and floats

CONFIG = LoraConfig(
    targets=r"body/.*/kernel", rank=2, alpha=4.0, trainable=(r"classifier/.*", r"embed/embedding")
)


def _params(rng, head_dtype=np.float32):
    """A small classifier: embedding, two body layers, a head (float32, or another dtype)."""

    def w(*shape, dtype=np.float32):
        return (rng.normal(size=shape) / np.sqrt(shape[0])).astype(dtype)

    return {
        "embed": {"embedding": w(13, 8)},
        "body": {
            "dense_0": {"kernel": w(8, 8), "bias": np.zeros(8, np.float32)},
            "dense_1": {"kernel": w(8, 8), "bias": np.zeros(8, np.float32)},
        },
        "classifier": {"kernel": w(8, 3, dtype=head_dtype), "bias": w(3, dtype=head_dtype)},
    }


def _trained(adapters, rng):
    """Random non-zero values in every leaf (as after training), dtypes kept."""
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)), adapters)


def _bits(x):
    return np.asarray(x).view(np.uint8)


# -- config ---------------------------------------------------------------------------------------


def test_config_trainable_is_validated_and_serialised():
    config = LoraConfig(targets="w", trainable="classifier/.*")
    assert config.trainable == ("classifier/.*",)
    assert config.is_trainable("classifier/kernel") and not config.is_trainable("w")
    again = LoraConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict()["trainable"] == ["classifier/.*"]
    assert "trainable" not in LoraConfig(targets="w").to_dict()  # readable by older jlora
    by_name = LoraConfig(targets="w", trainable=("classifier", "model/head"))
    assert by_name.is_trainable("classifier/kernel") and by_name.is_trainable("a/classifier/b/bias")
    assert by_name.is_trainable("model/head/kernel") and not by_name.is_trainable("head/kernel")
    assert not by_name.is_trainable("classifier_2/kernel")
    with pytest.raises(ConfigError, match=r"LoraConfig.trainable: 'head\(' is not a valid regular"):
        LoraConfig(targets="w", trainable=("head(",))
    with pytest.raises(ConfigError, match=r"LoraConfig.trainable: got \[3\]; expected a regular"):
        LoraConfig(targets="w", trainable=[3])


# -- init -----------------------------------------------------------------------------------------


def test_init_copies_each_trainable_leaf_with_its_dtype_and_sharding():
    rng = np.random.default_rng(0)
    params = _params(rng, head_dtype=ml_dtypes.bfloat16)
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    on_x = NamedSharding(mesh, PartitionSpec(None, "x"))
    params["embed"]["embedding"] = jax.device_put(params["embed"]["embedding"], on_x)
    adapters = jlora.init(jax.random.key(0), params, CONFIG)
    extras = {
        p: leaf
        for p, leaf in jax.tree_util.tree_leaves_with_path(
            adapters, is_leaf=lambda x: isinstance(x, Trainable)
        )
        if isinstance(leaf, Trainable)
    }
    assert len(extras) == 3
    for path, base in [
        (("classifier", "kernel"), params["classifier"]["kernel"]),
        (("classifier", "bias"), params["classifier"]["bias"]),
        (("embed", "embedding"), params["embed"]["embedding"]),
    ]:
        extra = adapters[path[0]][path[1]]
        assert isinstance(extra, Trainable)
        assert extra.value is not base and extra.value.dtype == base.dtype
        np.testing.assert_array_equal(_bits(extra.value), _bits(base))
    assert adapters["classifier"]["kernel"].value.dtype == jnp.bfloat16
    assert adapters["embed"]["embedding"].value.sharding == on_x
    assert set(adapters["body"]) == {"dense_0", "dense_1"}  # factors beside the extras
    # Extras are leaves like the factors: optax and jax.grad see them.
    assert len(jax.tree.leaves(adapters)) == 2 * 2 + 3


def test_init_refuses_bad_trainable_selections():
    params = _params(np.random.default_rng(1))
    key = jax.random.key(0)
    with pytest.raises(
        TargetError,
        match=r"trainable 'clasifier/.\*' matches no parameter path .* Closest paths: "
        r"\['classifier/",
    ):
        jlora.init(key, params, LoraConfig(targets="body/.*/kernel", trainable="clasifier/.*"))
    with pytest.raises(
        TargetError,
        match=r"body/dense_1/kernel: selected both by targets .* and by trainable .* Add it to "
        r"LoraConfig.exclude",
    ):
        jlora.init(key, params, LoraConfig(targets="body/.*/kernel", trainable="body/dense_1/.*"))
    with pytest.raises(TargetError, match=r"ids: trainable selects a leaf of dtype int32"):
        jlora.init(
            key,
            {**params, "ids": np.arange(3, dtype=np.int32)},
            LoraConfig(targets="body/.*/kernel", trainable="ids"),
        )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(NotAnArrayError, match=r"classifier/bias: .* holds a jax.ShapeDtypeStruct"):
        jlora.init(key, abstract, CONFIG)
    shapes = jax.eval_shape(lambda k, p: jlora.init(k, p, CONFIG), key, params)  # tracers: fine
    by_name = jlora.init(key, params, LoraConfig(targets="dense_0", trainable="classifier"))
    assert set(by_name["classifier"]) == {"kernel", "bias"} and set(by_name) == {
        "body",
        "classifier",
    }
    assert shapes["classifier"]["kernel"].value.shape == (8, 3)


# -- merge, unmerge, delta, count -----------------------------------------------------------------


def test_merge_replaces_extras_exactly_and_merges_factors():
    rng = np.random.default_rng(2)
    params = _params(rng, head_dtype=ml_dtypes.bfloat16)
    adapters = _trained(jlora.init(jax.random.key(0), params, CONFIG), rng)
    merged = jlora.merge(params, adapters)
    for module, name in [("classifier", "kernel"), ("classifier", "bias"), ("embed", "embedding")]:
        out, extra = merged[module][name], adapters[module][name].value
        assert out.dtype == params[module][name].dtype
        np.testing.assert_array_equal(_bits(out), _bits(extra))
    for layer in ("dense_0", "dense_1"):
        f = adapters["body"][layer]["kernel"]
        expected = params["body"][layer]["kernel"].astype(np.float64) + 2.0 * (
            np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64)
        )
        np.testing.assert_allclose(merged["body"][layer]["kernel"], expected, rtol=1e-5, atol=1e-5)
        assert merged["body"][layer]["bias"] is params["body"][layer]["bias"]


def test_merge_puts_extras_on_the_base_leaf_sharding():
    rng = np.random.default_rng(3)
    params = _params(rng)
    adapters = _trained(jlora.init(jax.random.key(0), params, CONFIG), rng)
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    on_x = NamedSharding(mesh, PartitionSpec("x"))
    params["embed"]["embedding"] = jax.device_put(
        params["embed"]["embedding"], NamedSharding(mesh, PartitionSpec(None, "x"))
    )
    params["classifier"]["kernel"] = jax.device_put(params["classifier"]["kernel"], on_x)
    merged = jlora.merge(params, adapters)
    assert merged["classifier"]["kernel"].sharding == on_x
    assert merged["embed"]["embedding"].sharding == params["embed"]["embedding"].sharding
    np.testing.assert_array_equal(
        merged["classifier"]["kernel"], adapters["classifier"]["kernel"].value
    )


def test_merge_refuses_extras_that_do_not_fit():
    rng = np.random.default_rng(4)
    params = _params(rng)
    adapters = jlora.init(jax.random.key(0), params, CONFIG)
    wrong_shape = {
        **adapters,
        "classifier": {**adapters["classifier"], "bias": Trainable(jnp.zeros(4))},
    }
    with pytest.raises(
        AdapterMismatchError,
        match=r"classifier/bias: the trainable extra has shape \(4,\) float32 but the base leaf "
        r"has shape \(3,\) float32",
    ):
        jlora.merge(params, wrong_shape)
    wrong_dtype = {
        **adapters,
        "classifier": {**adapters["classifier"], "bias": Trainable(jnp.zeros(3, jnp.bfloat16))},
    }
    with pytest.raises(
        AdapterMismatchError, match=r"classifier/bias: .* \(3,\) bfloat16 but .* float32"
    ):
        jlora.merge(params, wrong_dtype)
    stray = {**adapters, "head": Trainable(jnp.zeros(3))}
    with pytest.raises(
        AdapterMismatchError, match=r"head: the adapters have a trainable extra at this path but"
    ):
        jlora.merge(params, stray)
    with pytest.raises(
        AdapterMismatchError,
        match=r"w: adapter tree holds a ndarray, not LoraFactors or jlora.Trainable",
    ):
        jlora.merge({"w": np.zeros((2, 2), np.float32)}, {"w": np.ones((2, 2), np.float32)})


def test_unmerge_keeps_extras_and_merge_of_unmerge_is_exact():
    rng = np.random.default_rng(5)
    params = _params(rng)
    adapters = _trained(jlora.init(jax.random.key(0), params, CONFIG), rng)
    merged = jlora.merge(params, adapters)
    back = jlora.unmerge(merged, adapters)
    for layer in ("dense_0", "dense_1"):
        np.testing.assert_allclose(
            back["body"][layer]["kernel"], params["body"][layer]["kernel"], atol=1e-5
        )
    # The base's values of extras are not recoverable: unmerge leaves the trained ones...
    np.testing.assert_array_equal(
        back["classifier"]["kernel"], adapters["classifier"]["kernel"].value
    )
    # ...and merging again gives the merged tree back at those leaves, bit for bit.
    again = jlora.merge(back, adapters)
    for module, name in [("classifier", "kernel"), ("classifier", "bias"), ("embed", "embedding")]:
        np.testing.assert_array_equal(_bits(again[module][name]), _bits(merged[module][name]))


def test_delta_leaves_extras_out_and_count_params_counts_them():
    rng = np.random.default_rng(6)
    params = _params(rng)
    adapters = _trained(jlora.init(jax.random.key(0), params, CONFIG), rng)
    deltas = jlora.delta(adapters)
    assert set(deltas) == {"body"}
    f = adapters["body"]["dense_0"]["kernel"]
    np.testing.assert_allclose(
        deltas["body"]["dense_0"]["kernel"],
        2.0 * np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64),
        rtol=1e-5,
        atol=1e-6,
    )
    count = jlora.count_params(params, adapters)
    extras = 8 * 3 + 3 + 13 * 8
    base = sum(np.size(x) for x in jax.tree.leaves(params))
    assert count.extras == extras
    assert count.trainable == 2 * (8 * 2 + 2 * 8) + extras
    assert count.total == base + 2 * (8 * 2 + 2 * 8)  # each extra replaces a base leaf
    assert f"(extras: {extras})" in str(count)


# -- optim ----------------------------------------------------------------------------------------


def test_freeze_base_trains_extras_with_adam_and_leaves_the_base_bit_identical():
    rng = np.random.default_rng(7)
    params = jax.tree.map(jnp.asarray, _params(rng))
    adapters = jlora.init(jax.random.key(0), params, CONFIG)
    tree = {"params": params, "lora": adapters}
    tags = labels(tree, trainable="extra")
    assert tags["lora"]["classifier"]["kernel"] == Trainable("extra")
    assert tags["params"]["classifier"]["kernel"] == "frozen"
    assert jax.tree.leaves(mask(tree)["lora"]["embed"]) == [True]
    grads = _trained(tree, rng)
    tx = freeze_base(optax.adam(1e-2))
    with standard_promotion:
        state = tx.init(tree)
        updates, state = tx.update(grads, state, tree)
        new = optax.apply_updates(tree, updates)
    for leaf in jax.tree.leaves(updates["params"]):
        assert not np.any(np.asarray(leaf))
    for old, leaf in zip(jax.tree.leaves(params), jax.tree.leaves(new["params"]), strict=True):
        np.testing.assert_array_equal(_bits(leaf), _bits(old))
    for module, name in [("classifier", "kernel"), ("classifier", "bias"), ("embed", "embedding")]:
        u = np.asarray(updates["lora"][module][name].value)
        # Adam's first step is -lr * sign(g) (up to eps): every entry moves.
        np.testing.assert_allclose(
            u, -1e-2 * np.sign(np.asarray(grads["lora"][module][name].value)), rtol=1e-4
        )
    assert np.all(np.asarray(updates["lora"]["body"]["dense_0"]["kernel"].b) != 0)


def test_lora_plus_treats_extras_as_plain_parameters():
    rng = np.random.default_rng(8)
    adapters = jlora.init(jax.random.key(0), _params(rng), CONFIG)
    grads = _trained(adapters, rng)
    with standard_promotion:
        plain, _ = optax.adam(1e-3).update(grads, optax.adam(1e-3).init(adapters), adapters)
        tx = lora_plus(optax.adam(1e-3), ratio=16.0)
        plus, _ = tx.update(grads, tx.init(adapters), adapters)
    np.testing.assert_array_equal(
        plus["classifier"]["kernel"].value, plain["classifier"]["kernel"].value
    )
    np.testing.assert_array_equal(
        plus["body"]["dense_0"]["kernel"].a, plain["body"]["dense_0"]["kernel"].a
    )
    np.testing.assert_allclose(
        plus["body"]["dense_0"]["kernel"].b,
        16.0 * np.asarray(plain["body"]["dense_0"]["kernel"].b),
        rtol=1e-6,
    )


# -- linen ----------------------------------------------------------------------------------------


class _Classifier(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(13, 8, name="embed")(ids).mean(axis=1)
        h = nn.Dense(8, name="body_1")(nn.relu(nn.Dense(8, name="body_0")(h)))
        return nn.Dense(3, name="classifier")(nn.relu(h))


def test_linen_apply_uses_extras_and_differentiates_them():
    rng = np.random.default_rng(9)
    model = _Classifier()
    ids = jnp.asarray(rng.integers(0, 13, size=(4, 5)))
    # Compiled inits, losses and gradients (eagerly, each op would compile a program of its own).
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    config = LoraConfig(targets=r"body_\d/kernel", rank=2, trainable=(r"classifier/.*",))
    adapted = jlora.linen.lora(model, config)
    adapters = jax.jit(adapted.init_adapters)(jax.random.key(1), params, ids)
    assert isinstance(adapters["classifier"]["kernel"], Trainable)
    np.testing.assert_array_equal(
        adapted.apply(params, adapters, ids), model.apply({"params": params}, ids)
    )
    adapters = _trained(adapters, rng)
    y = jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32))

    def loss(adapters):
        return jnp.mean((adapted.apply(params, adapters, ids) - y) ** 2)

    merged = jax.jit(jlora.merge)(params, adapters)

    def merged_loss(head):
        tree = {**merged, "classifier": head}
        return jnp.mean((model.apply({"params": tree}, ids) - y) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(adapters)
    merged_value, expected = jax.jit(jax.value_and_grad(merged_loss))(merged["classifier"])
    np.testing.assert_allclose(value, merged_value, rtol=1e-5)
    for name in ("kernel", "bias"):
        assert np.any(np.asarray(grads["classifier"][name].value) != 0)
        np.testing.assert_allclose(
            grads["classifier"][name].value, expected[name], rtol=1e-4, atol=1e-6
        )
    stray = {**adapters, "head": {"kernel": Trainable(jnp.zeros((8, 3)))}}
    with pytest.raises(
        AdapterMismatchError, match=r"head/kernel: the adapters have a trainable extra at this path"
    ):
        adapted.apply(params, stray, ids)


# -- nnx ------------------------------------------------------------------------------------------


def _nnx_model():
    return nnx.Sequential(
        nnx.Linear(6, 8, rngs=nnx.Rngs(0)),
        nnx.Linear(8, 8, rngs=nnx.Rngs(1)),
        nnx.Linear(8, 3, rngs=nnx.Rngs(2)),
    )


NNX_CONFIG = LoraConfig(targets=r"layers/[01]/kernel", rank=2, trainable=(r"layers/2/.*",))


def test_nnx_optimizer_over_trainable_trains_factors_and_head_only():
    rng = np.random.default_rng(10)
    model = _nnx_model()
    graphdef_base = nnx.graphdef(model)
    jlora.nnx.lora(model, NNX_CONFIG, rngs=3)
    assert type(model.layers[2].kernel) is nnx.Param  # still a Param: Param filters unchanged
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jlora.nnx.TRAINABLE)
    x = jnp.asarray(rng.normal(size=(5, 6)).astype(np.float32))
    y = jnp.asarray(rng.normal(size=(5, 3)).astype(np.float32))
    grad = nnx.grad(
        lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, jlora.nnx.TRAINABLE)
    )
    step = nnx.jit(lambda m, o: o.update(m, grad(m)))  # one program, not one per eager op
    for _ in range(2):  # b = 0 at init, so a moves from the second step on
        with standard_promotion:
            step(model, optimizer)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    trained = {"2/kernel", "2/bias", "0/lora_a", "0/lora_b", "1/lora_a", "1/lora_b"}
    for (path, old), (_, new) in zip(
        jax.tree_util.tree_leaves_with_path(before["layers"]),
        jax.tree_util.tree_leaves_with_path(after["layers"]),
        strict=True,
    ):
        name = "/".join(str(k.key) for k in path)
        if name in trained:
            assert np.any(new != old), name
        else:
            np.testing.assert_array_equal(_bits(new), _bits(old), err_msg=name)
    # The functional view: extras as Trainable, and jlora.merge equals jlora.nnx.merge.
    adapters = jlora.nnx.to_adapters(model)
    assert isinstance(adapters["layers"]["2"]["kernel"], Trainable)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    merged = jlora.nnx.merge(model)
    assert nnx.graphdef(merged) == graphdef_base  # no mark left
    expected = jlora.merge(params, adapters)
    for (_, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(expected),
        jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(merged, nnx.Param))),
        strict=True,
    ):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_nnx_set_adapters_loads_extras_and_checks_them():
    rng = np.random.default_rng(11)
    model = jlora.nnx.lora(_nnx_model(), NNX_CONFIG, rngs=0)
    adapters = _trained(jlora.nnx.to_adapters(model), rng)
    jlora.nnx.set_adapters(model, adapters)
    np.testing.assert_array_equal(
        model.layers[2].kernel.get_value(), adapters["layers"]["2"]["kernel"].value
    )
    np.testing.assert_array_equal(
        model.layers[0].lora_b.get_value(), adapters["layers"]["0"]["kernel"].b
    )
    without = {"layers": {k: v for k, v in adapters["layers"].items() if k != "2"}}
    with pytest.raises(
        AdapterMismatchError,
        match=r"layers/2/bias: a trainable extra at this path is in the model only",
    ):
        jlora.nnx.set_adapters(model, without)
    wrong = {
        "layers": {
            **adapters["layers"],
            "2": {**adapters["layers"]["2"], "bias": Trainable(jnp.zeros(5))},
        }
    }
    with pytest.raises(
        AdapterMismatchError, match=r"layers/2/bias: the trainable extra has shape \(5,\)"
    ):
        jlora.nnx.set_adapters(model, wrong)
    with pytest.raises(TargetError, match=r"trainable 'layers/3/.\*' matches no parameter path"):
        jlora.nnx.lora(
            _nnx_model(), LoraConfig(targets="layers/0/kernel", trainable="layers/3/.*"), rngs=0
        )
    with pytest.raises(TargetError, match=r"layers/0/kernel: selected both by targets"):
        jlora.nnx.lora(
            _nnx_model(), LoraConfig(targets="layers/0/kernel", trainable="layers/0/.*"), rngs=0
        )


# -- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_of_extras_is_bit_exact(tmp_path):
    rng = np.random.default_rng(12)
    params = _params(rng, head_dtype=ml_dtypes.bfloat16)
    adapters = _trained(jlora.init(jax.random.key(0), params, CONFIG), rng)
    path = checkpoint.save(tmp_path / "adapter", adapters, CONFIG, base=params)
    with open(path / "jlora" / "metadata") as fh:
        record = json.load(fh)
    assert record["version"] == 2
    assert record["trainable"]["classifier/kernel"] == {"shape": [8, 3], "dtype": "bfloat16"}
    assert sorted(record["trainable"]) == [
        "classifier/bias",
        "classifier/kernel",
        "embed/embedding",
    ]
    assert record["config"]["trainable"] == ["classifier/.*", "embed/embedding"]
    for kwargs in (
        {},
        {"target": jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, CONFIG), params)},
    ):
        restored, config = checkpoint.restore(path, base=params, **kwargs)
        assert config == CONFIG
        assert jax.tree.structure(restored) == jax.tree.structure(adapters)
        for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(restored), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(_bits(a), _bits(b))
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    on_x = NamedSharding(mesh, PartitionSpec(None, "x"))
    everywhere = NamedSharding(mesh, PartitionSpec())
    restored, _ = checkpoint.restore(path, shardings=everywhere)
    assert restored["embed"]["embedding"].value.sharding == everywhere
    shardings = jlora.sharding.factor_shardings(
        adapters, {**jax.tree.map(lambda _: everywhere, params), "embed": {"embedding": on_x}}
    )
    restored, _ = checkpoint.restore(path, shardings=shardings)
    assert restored["embed"]["embedding"].value.sharding == on_x
    np.testing.assert_array_equal(
        restored["embed"]["embedding"].value, adapters["embed"]["embedding"].value
    )
    with pytest.raises(
        AdapterMismatchError, match=r"classifier/bias: .* no entry for this trainable extra"
    ):
        checkpoint.restore(
            path, shardings={"body": {"dense_0": {"kernel": on_x}, "dense_1": {"kernel": on_x}}}
        )
    no_head = LoraConfig(
        targets=r"body/.*/kernel", rank=2, alpha=4.0, trainable=("embed/embedding",)
    )
    with pytest.raises(
        AdapterMismatchError,
        match=r"classifier/bias: the adapters hold a trainable extra here but the",
    ):
        checkpoint.save(tmp_path / "other", adapters, no_head)


def test_checkpoint_without_extras_stays_version_1(tmp_path):
    rng = np.random.default_rng(13)
    params = _params(rng)
    config = LoraConfig(targets=r"body/.*/kernel", rank=2)
    path = checkpoint.save(tmp_path / "a", jlora.init(jax.random.key(0), params, config), config)
    with open(path / "jlora" / "metadata") as fh:
        record = json.load(fh)
    assert record["version"] == 1 and "trainable" not in record
    assert "trainable" not in record["config"]


def test_merge_checkpoint_writes_extras_like_the_in_memory_merge(tmp_path):
    import orbax.checkpoint as ocp
    from orbax.checkpoint.experimental import v1 as ocp_v1

    rng = np.random.default_rng(14)
    params = _params(rng)
    adapters = _trained(jlora.init(jax.random.key(0), params, CONFIG), rng)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapter", adapters, CONFIG, base=params)
    summary = checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert summary.merged == 2 + 3
    on_disk = ocp_v1.load(tmp_path / "out")
    expected = jlora.merge(params, adapters)
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(expected),
        jax.tree_util.tree_leaves_with_path(on_disk),
        strict=True,
    ):
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(path))


# -- PEFT -----------------------------------------------------------------------------------------

PEFT_CONFIG = LoraConfig(
    targets=r"body/.*/kernel", rank=2, alpha=4.0, trainable=(r"classifier/.*", r"embed/embedding")
)


def test_peft_round_trip_writes_modules_to_save_in_torch_layout(tmp_path):
    rng = np.random.default_rng(15)
    params = _params(rng)
    adapters = _trained(jlora.init(jax.random.key(0), params, PEFT_CONFIG), rng)
    jpeft.save(tmp_path, adapters, PEFT_CONFIG)
    with open(tmp_path / "adapter_config.json") as fh:
        cfg = json.load(fh)
    assert cfg["modules_to_save"] == ["classifier", "embed"]
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    # PEFT's names for modules_to_save: the module's own state-dict keys; torch Linear is (out, in).
    np.testing.assert_array_equal(
        tensors["base_model.model.classifier.weight"],
        np.asarray(adapters["classifier"]["kernel"].value).T,
    )
    np.testing.assert_array_equal(
        tensors["base_model.model.classifier.bias"], adapters["classifier"]["bias"].value
    )
    np.testing.assert_array_equal(
        tensors["base_model.model.embed.weight"], adapters["embed"]["embedding"].value
    )
    loaded, config = jpeft.load(tmp_path, params)
    assert config.trainable == ("classifier/bias", "classifier/kernel", "embed/embedding")
    assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_peft_load_reads_a_peft_written_modules_to_save_file(tmp_path):
    rng = np.random.default_rng(16)
    params = _params(rng, head_dtype=ml_dtypes.bfloat16)
    weight = rng.normal(size=(3, 8)).astype(np.float32)  # torch Linear: (out, in)
    bias = rng.normal(size=3).astype(np.float32)
    a = rng.normal(size=(2, 8)).astype(np.float32)
    b = rng.normal(size=(8, 2)).astype(np.float32)
    tensors = {
        "base_model.model.body.dense_0.lora_A.weight": a,
        "base_model.model.body.dense_0.lora_B.weight": b,
        "base_model.model.classifier.weight": weight,
        "base_model.model.classifier.bias": bias,
    }
    cfg = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["dense_0"],
        "modules_to_save": ["classifier"],
    }
    os.makedirs(tmp_path, exist_ok=True)
    with open(tmp_path / "adapter_config.json", "w") as fh:
        json.dump(cfg, fh)
    save_file(tensors, os.path.join(tmp_path, "adapter_model.safetensors"))
    adapters, config = jpeft.load(tmp_path, params)
    kernel = adapters["classifier"]["kernel"].value
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel, np.float32), weight.T.astype(ml_dtypes.bfloat16).astype(np.float32)
    )
    np.testing.assert_array_equal(np.asarray(adapters["body"]["dense_0"]["kernel"].a), a.T)
    assert config.trainable == ("classifier/bias", "classifier/kernel")
    jlora.merge(params, adapters)  # fits the base


def test_peft_refuses_extras_it_cannot_write_or_read(tmp_path):
    rng = np.random.default_rng(17)
    params = _params(rng)
    params["stack"] = rng.normal(size=(2, 3, 4)).astype(np.float32)
    config = LoraConfig(targets=r"body/.*/kernel", rank=2, trainable=("stack",))
    adapters = jlora.init(jax.random.key(0), params, config)
    with pytest.raises(
        jpeft.PeftFormatError, match=r"stack: a trainable extra of shape \(2, 3, 4\)"
    ):
        jpeft.save(tmp_path, adapters, config)
    config = LoraConfig(targets=r"body/.*/kernel", rank=2, trainable=("body/dense_0/bias",))
    adapters = jlora.init(jax.random.key(0), params, config)
    with pytest.raises(
        jpeft.PeftFormatError,
        match=r"body/dense_0/bias: a trainable extra of torch module 'body.dense_0', which also",
    ):
        jpeft.save(tmp_path, adapters, config)
    adapters = jlora.init(jax.random.key(0), _params(rng), PEFT_CONFIG)
    jpeft.save(tmp_path, adapters, PEFT_CONFIG)
    other = _params(rng)
    other["classifier"] = {"kernel": np.zeros((8, 5), np.float32), "bias": np.zeros(3, np.float32)}
    with pytest.raises(
        AdapterMismatchError,
        match=r"classifier.weight: saved module tensor of shape \(3, 8\) .* fits no parameter",
    ):
        jpeft.load(tmp_path, other)


# -- sharding -------------------------------------------------------------------------------------


def test_sharded_init_and_factor_shardings_carry_extras():
    rng = np.random.default_rng(18)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    specs = {
        "embed": {"embedding": PartitionSpec(None, "model")},
        "body": {
            "dense_0": {"kernel": PartitionSpec("data", "model"), "bias": PartitionSpec()},
            "dense_1": {"kernel": PartitionSpec("model", None), "bias": PartitionSpec()},
        },
        "classifier": {"kernel": PartitionSpec("data"), "bias": PartitionSpec()},
    }
    host = _params(rng)
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), host, specs)
    sharded = jlora.sharding.init(jax.random.key(0), params, CONFIG)
    plain = jlora.init(jax.random.key(0), host, CONFIG)
    assert jax.tree.structure(sharded) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    assert sharded["classifier"]["kernel"].value.sharding == params["classifier"]["kernel"].sharding
    shardings = jlora.sharding.factor_shardings(sharded, specs, mesh)
    assert shardings["classifier"]["kernel"] == Trainable(
        NamedSharding(mesh, PartitionSpec("data"))
    )
    from_arrays = jlora.sharding.factor_shardings(
        sharded, jax.tree.map(lambda x: x.sharding, params)
    )
    assert from_arrays["embed"]["embedding"].value == params["embed"]["embedding"].sharding


# -- "all-linear" targets spare the head, which can then train in full ----------------------------


class _Head(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.body = nnx.Linear(6, 8, rngs=rngs)
        self.classifier = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.classifier(nnx.relu(self.body(x)))


def test_all_linear_targets_with_a_trainable_head():
    rng = np.random.default_rng(19)
    config = LoraConfig(targets="all-linear", rank=2, trainable=("classifier",))
    model = jlora.nnx.lora(_Head(nnx.Rngs(0)), config, rngs=1)
    adapters = jlora.nnx.to_adapters(model)
    assert isinstance(adapters["body"]["kernel"], jlora.LoraFactors)
    assert set(adapters["classifier"]) == {"kernel", "bias"}
    assert all(isinstance(v, Trainable) for v in adapters["classifier"].values())
    linen_model = _Classifier()
    ids = jnp.asarray(rng.integers(0, 13, size=(4, 5)))
    params = linen_model.init(jax.random.key(0), ids)["params"]
    adapted = jlora.linen.lora(linen_model, config)
    linen_adapters = adapted.init_adapters(jax.random.key(1), params, ids)
    assert set(linen_adapters["classifier"]) == {"kernel", "bias"}
    assert isinstance(linen_adapters["body_0"]["kernel"], jlora.LoraFactors)
    # The functional core cannot tell the head, but a preset never claims a trainable leaf.
    core = jlora.init(jax.random.key(0), params, config)
    assert isinstance(core["classifier"]["kernel"], Trainable)
    assert isinstance(core["body_0"]["kernel"], jlora.LoraFactors)
    explicit = LoraConfig(targets=".*kernel", rank=2, trainable=("classifier",))
    with pytest.raises(TargetError, match=r"classifier/kernel: selected both by targets"):
        jlora.init(jax.random.key(0), params, explicit)
