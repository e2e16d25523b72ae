import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from trees import random_factors, transformer_params

import jlora
from jlora import AdapterMismatchError, LoraConfig
from jlora import sharding as lsh


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def megatron_specs(params):
    """Column-parallel q/k/v/up, row-parallel out/down, everything else replicated."""

    def spec(path, leaf):
        name = jlora._paths.path_to_str(path)
        if name.endswith(("query/kernel", "key/kernel", "value/kernel", "up/kernel")):
            return P(None, "model")
        if name.endswith(("out/kernel", "down/kernel")):
            return P("model", None)
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


def test_specs_follow_fan_in_and_fan_out_axes():
    params = {
        "stack": {"kernel": jnp.zeros((4, 8, 16))},
        "q": {"kernel": jnp.zeros((8, 4, 2))},
        "conv": {"kernel": jnp.zeros((3, 3, 8, 16))},
    }
    config = LoraConfig(
        targets=".*kernel", rank=2, layouts={"stack/.*": "sio", "q/.*": "ioo", "conv/.*": "iiio"}
    )
    adapters = jlora.init(jax.random.key(0), params, config)
    specs = lsh.factor_specs(
        adapters,
        {
            "stack": {"kernel": P("layers", "data", "model")},
            "q": {
                "kernel": P("data", "model")
            },  # shorter than the weight: trailing axes replicated
            "conv": {"kernel": None},
        },
    )
    assert tuple(specs["stack"]["kernel"].a) == ("layers", "data", None)
    assert tuple(specs["stack"]["kernel"].b) == ("layers", None, "model")
    assert tuple(specs["q"]["kernel"].a) == ("data", None)
    assert tuple(specs["q"]["kernel"].b) == (None, "model", None)
    assert tuple(specs["conv"]["kernel"].a) == (None,) * 4
    assert tuple(specs["conv"]["kernel"].b) == (None, None)


def test_spec_longer_than_weight():
    params = {"w": jnp.zeros((8, 4))}
    adapters = jlora.init(jax.random.key(0), params, LoraConfig(targets="w", rank=2))
    with pytest.raises(
        AdapterMismatchError, match=r"w: PartitionSpec .* has 3 entries but the weight has 2 axes"
    ):
        lsh.factor_specs(adapters, {"w": P("a", "b", "c")})
    with pytest.raises(AdapterMismatchError, match=r"w: no PartitionSpec for this adapted weight"):
        lsh.factor_specs(adapters, {"v": P()})


def test_unknown_mesh_axis_and_non_named_sharding(mesh):
    params = {"w": jnp.zeros((8, 4))}
    adapters = jlora.init(jax.random.key(0), params, LoraConfig(targets="w", rank=2))
    with pytest.raises(
        AdapterMismatchError,
        match=r"w: PartitionSpec .* names mesh axis 'tensor' but the mesh has axes \('data', 'model'\)",
    ):
        lsh.factor_shardings(adapters, {"w": P("tensor", None)}, mesh)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(
        AdapterMismatchError, match=r"w: expected a NamedSharding .* found SingleDeviceSharding"
    ):
        lsh.factor_shardings(adapters, {"w": single})


def test_sharded_init_equals_init_and_lands_on_shardings(mesh):
    params = transformer_params(d_model=16, d_ff=32)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), megatron_specs(params))
    sharded_params = jax.device_put(params, shardings)
    config = LoraConfig(targets=r".*/kernel", rank=4)
    key = jax.random.key(3)
    sharded = lsh.init(key, sharded_params, config)
    plain = jlora.init(key, params, config)
    for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(x, y)
    q = sharded["layers_0"]["attn"]["query"]["kernel"]
    o = sharded["layers_1"]["attn"]["out"]["kernel"]
    assert q.a.sharding.spec == P(None, None) and q.b.sharding.spec == P(None, "model")
    assert o.a.sharding.spec == P("model", None) and o.b.sharding.spec == P(None, None)
    # The row-parallel `a` really is split over the model axis: each device holds a quarter.
    assert o.a.addressable_shards[0].data.shape == (16 // 4, 4)


def test_merge_keeps_every_weight_on_its_sharding(mesh):
    params = transformer_params(d_model=16, d_ff=32)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), megatron_specs(params))
    sharded_params = jax.device_put(params, shardings)
    config = LoraConfig(targets=r".*/kernel", rank=4)
    adapters = random_factors(jlora.init(jax.random.key(0), params, config))
    adapters = jax.device_put(adapters, lsh.factor_shardings(adapters, shardings))
    merged = jlora.merge(sharded_params, adapters)
    for m, s in zip(jax.tree.leaves(merged), jax.tree.leaves(shardings), strict=True):
        assert m.sharding == s
    expected = jlora.merge(params, jax.device_get(adapters))
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(x, y)
