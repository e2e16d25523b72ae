import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharded_decoder as sd
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import assert_merge_within_roundoff
from trees import random_factors, transformer_params

import jlora
from jlora import AdapterMismatchError, LoraConfig
from jlora import sharding as lsh
from jlora.checkpoint._restore import _single_device_sharding


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
    single = _single_device_sharding(jax.devices()[0])
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
    # Exact, as design.md promises: one jitted init function (sharding only adds out_shardings),
    # threefry bits that do not depend on the sharding, and element-wise maths with no sums.
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
    # Not bit-equal to an unsharded merge: XLA:CPU may sum a column-parallel shard's products in
    # another order (its dot kernels choose by output width). Both are within round-off of float64.
    base, got = (dict(jlora._paths.leaves_with_paths(t)) for t in (params, merged))
    for path, f in jlora._merge.factors_by_path(jax.device_get(adapters)).items():
        assert_merge_within_roundoff(got[path], base[path], f, err_msg=path)


# The scanned decoder: stacked (layers, ...) weights, 2-D sharded --------------------------------


def test_merge_keeps_the_sharding_of_stacked_scanned_weights(mesh):
    params = sd.params()
    # FSDP x TP: each kernel split over both mesh axes, behind the unsharded layer axis.
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), sd.specs(params, fsdp="data"))
    sharded_params = jax.device_put(params, shardings)
    targets = ("layers/attn/query/kernel", "layers/attn/out/kernel")  # column- and row-parallel
    config = dataclasses.replace(sd.CONFIG, targets=targets)
    adapters = random_factors(jlora.init(jax.random.key(0), params, config))
    factor_shardings = lsh.factor_shardings(adapters, shardings)
    q, out = (factor_shardings["layers"]["attn"][name]["kernel"] for name in ("query", "out"))
    assert q.a.spec == P(None, "data", None) and q.b.spec == P(None, None, "model", None)
    assert out.a.spec == P(None, "model", None, None) and out.b.spec == P(None, None, "data")
    merged = jlora.merge(sharded_params, jax.device_put(adapters, factor_shardings))
    for m, s in zip(jax.tree.leaves(merged), jax.tree.leaves(shardings), strict=True):
        assert m.sharding == s
    assert merged["layers"]["attn"]["out"]["kernel"].addressable_shards[0].data.shape == (
        3,
        1,
        6,
        8,
    )
    for name in ("query", "out"):
        f = adapters["layers"]["attn"][name]["kernel"]
        w = params["layers"]["attn"][name]["kernel"]
        assert_merge_within_roundoff(merged["layers"]["attn"][name]["kernel"], w, f, err_msg=name)
    assert merged["layers"]["up"]["kernel"] is sharded_params["layers"]["up"]["kernel"]


def test_init_takes_partition_specs_with_a_mesh(mesh):
    params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)}  # abstract: nothing allocated
    config = LoraConfig(targets="w", rank=2)
    adapters = lsh.init(jax.random.key(0), params, config, {"w": P("model", None)}, mesh=mesh)
    assert adapters["w"].a.sharding == NamedSharding(mesh, P("model", None))
    np.testing.assert_array_equal(  # exact: the same jitted init, as above
        adapters["w"].a, jlora.init(jax.random.key(0), params, config)["w"].a
    )
    with pytest.raises(
        AdapterMismatchError,
        match=r"^w: PartitionSpec P\('tensor', None\) names mesh axis 'tensor' but the mesh has "
        r"axes \('data', 'model'\)",
    ):
        lsh.init(jax.random.key(0), params, config, {"w": P("tensor", None)}, mesh=mesh)


# check_factor_shardings ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stacked():
    params = {"blocks": {"q": {"kernel": jnp.zeros((2, 8, 4, 2))}}}  # (layers, d, heads, head_dim)
    config = LoraConfig(targets=".*kernel", rank=2, layouts={".*": "sioo"})
    return jlora.init(jax.random.key(0), params, config)


def test_derived_and_actual_factor_shardings_pass_the_check(mesh, stacked):
    spec = {"blocks": {"q": {"kernel": P(None, "data", "model", None)}}}
    derived = lsh.factor_shardings(stacked, spec, mesh)
    lsh.check_factor_shardings(stacked, derived)
    placed = jax.device_put(stacked, derived)
    lsh.check_factor_shardings(placed, jax.tree.map(lambda x: x.sharding, placed))
    specs = {"blocks": {"q": {"kernel": {"a": P(None, "data"), "b": P(None, None, "model")}}}}
    lsh.check_factor_shardings(stacked, specs, mesh)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (
            P(None, None, "model"),
            P(),
            r"^blocks/q/kernel: factor a has PartitionSpec P\(None, None, 'model'\), which shards "
            r"the rank axis \(axis 2 of shape \(2, 8, 2\)\) over mesh axis 'model'; the rank axis "
            r"must be replicated",
        ),
        (
            P(),
            P(None, ("data", "model")),
            r"^blocks/q/kernel: factor b has PartitionSpec .*, which shards the rank axis \(axis 1 "
            r"of shape \(2, 2, 4, 2\)\) over mesh axis \('data', 'model'\)",
        ),
        (
            P("layers"),
            P(),
            r"^blocks/q/kernel: factor a: PartitionSpec P\('layers',\) names mesh axis 'layers' "
            r"but the mesh has axes \('data', 'model'\)",
        ),
        (
            P(None, None, None, None),
            P(),
            r"^blocks/q/kernel: factor a has PartitionSpec .* with 4 entries but only 3 axes "
            r"\(shape \(2, 8, 2\)\)",
        ),
        (
            P(),
            "model",
            r"^blocks/q/kernel: factor b: expected a NamedSharding or, with mesh=, a "
            r"PartitionSpec; found str",
        ),
    ],
)
def test_bad_factor_shardings(mesh, stacked, a, b, message):
    shardings = {"blocks": {"q": {"kernel": {"a": a, "b": b}}}}
    with pytest.raises(AdapterMismatchError, match=message):
        lsh.check_factor_shardings(stacked, shardings, mesh)


def test_factor_shardings_missing_or_without_a_mesh(mesh, stacked):
    with pytest.raises(
        AdapterMismatchError,
        match=r"^blocks/q/kernel: factor b has no sharding in shardings; expected a tree like the "
        r"adapters",
    ):
        lsh.check_factor_shardings(stacked, {"blocks": {"q": {"kernel": {"a": P()}}}}, mesh)
    with pytest.raises(
        AdapterMismatchError,
        match=r"^blocks/q/kernel: factor a: PartitionSpec P\(\) needs a mesh; pass mesh= or a "
        r"NamedSharding",
    ):
        lsh.check_factor_shardings(stacked, {"blocks": {"q": {"kernel": {"a": P(), "b": P()}}}})


def test_a_split_that_does_not_divide_its_axis_names_the_path(mesh):
    params = {"w": jax.ShapeDtypeStruct((6, 8), jnp.float32)}  # 6 rows over 4 model devices
    config = LoraConfig(targets="w", rank=2)
    adapters = jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, config))
    message = (
        r"^w: factor a: PartitionSpec P\('model', None\) splits axis 0 of shape \(6, 2\) into 4 "
        r"parts \(mesh axes 'model'\), which do not divide 6; choose mesh axes whose sizes divide "
        r"it, or leave this axis replicated \(None\)"
    )
    with pytest.raises(AdapterMismatchError, match=message):
        lsh.factor_shardings(adapters, {"w": P("model", None)}, mesh)
    with pytest.raises(AdapterMismatchError, match=message):
        lsh.init(jax.random.key(0), params, config, {"w": P("model", None)}, mesh=mesh)
    with pytest.raises(AdapterMismatchError, match=message.replace("'model', None", "'model',")):
        lsh.check_factor_shardings(adapters, {"w": {"a": P("model"), "b": P()}}, mesh)
