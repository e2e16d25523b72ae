"""Boxed params (`nn.with_logical_partitioning`, `nn.with_partitioning`) work as plain ones do, and
the factors come out boxed with derived axis names that Flax's own sharding helpers read."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import assert_merge_within_roundoff

import jlora
import jlora.linen
import jlora.sharding
from jlora import AdapterMismatchError, LoraConfig, LoraFactors
from jlora.sharding import RANK_AXIS

RULES = (("batch", "data"), ("embed", None), ("mlp", "model"), ("heads", "model"), ("kv", None))


def _logical(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, kernel_init=_logical(("embed", "mlp")), name="up")(x)
        h = nn.DenseGeneral((4, 2), kernel_init=_logical(("mlp", "heads", "kv")), name="heads")(
            jax.nn.gelu(h)
        )
        down = nn.DenseGeneral(8, axis=(-2, -1), kernel_init=_logical(("heads", "kv", "embed")))
        return x + down(h)


def _setup(seed: int):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    boxed = Block().init(jax.random.key(seed), x)["params"]
    # NumPy values in the same boxes (no per-shape initialiser compiles).
    params = jax.tree.map(lambda v: jnp.asarray(0.3 * rng.normal(size=v.shape), v.dtype), boxed)
    return x, params


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def test_targets_match_the_weights_path_without_the_box():
    x, params = _setup(0)
    assert isinstance(params["up"]["kernel"], nn.LogicallyPartitioned)
    adapted = jlora.linen.lora(Block(), LoraConfig(targets=".*/kernel", rank=2))
    adapters = adapted.init_adapters(jax.random.key(1), params, x)
    assert sorted(adapters) == ["DenseGeneral_0", "heads", "up"]
    specs = nn.get_partition_spec(adapters)
    assert specs["up"]["kernel"].a == P("embed", RANK_AXIS)
    assert specs["up"]["kernel"].b == P(RANK_AXIS, "mlp")
    assert specs["heads"]["kernel"].b == P(RANK_AXIS, "heads", "kv")
    assert specs["DenseGeneral_0"]["kernel"].a == P("heads", "kv", RANK_AXIS)
    # The functional core reads boxed trees alike.
    same = jlora.init(jax.random.key(1), params, LoraConfig(targets="up/kernel", rank=2))
    assert isinstance(same["up"]["kernel"].a, nn.LogicallyPartitioned)


def test_boxed_step_on_a_mesh_equals_the_unboxed_one_and_merge_keeps_the_boxes():
    x, params = _setup(2)
    adapted = jlora.linen.lora(Block(), LoraConfig(targets=".*/kernel", rank=2))
    adapters = adapted.init_adapters(jax.random.key(3), params, x)
    rng = np.random.default_rng(4)
    adapters = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), adapters)
    mesh = _mesh()
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(params), mesh, RULES)
    factor_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(adapters), mesh, RULES)
    assert factor_shardings["up"]["kernel"].b.spec == P(None, "model")  # rank replicated
    jlora.sharding.check_factor_shardings(adapters, factor_shardings, mesh)
    sharded_params = jax.device_put(params, param_shardings)
    sharded_adapters = jax.device_put(adapters, factor_shardings)

    def loss(adapters, params, x):
        return jnp.mean(adapted.apply(params, adapters, x) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    value, grads = step(sharded_adapters, sharded_params, x)
    plain_params, plain_adapters = nn.unbox(params), nn.unbox(adapters)
    want, want_grads = jax.value_and_grad(loss)(plain_adapters, plain_params, x)
    np.testing.assert_allclose(value, want, rtol=2e-5)  # different programs: round-off only
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))
    assert isinstance(grads["up"]["kernel"].a, nn.LogicallyPartitioned)  # grads keep the boxes
    assert grads["up"]["kernel"].a.value.sharding.is_fully_replicated  # ("embed", rank): None
    merged = jlora.merge(sharded_params, sharded_adapters)
    kernel = merged["up"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned) and kernel.names == ("embed", "mlp")
    assert kernel.value.sharding == sharded_params["up"]["kernel"].value.sharding
    # A sharded merge is another program than an unsharded one: compare with float64.
    assert_merge_within_roundoff(
        kernel.value, plain_params["up"]["kernel"], plain_adapters["up"]["kernel"]
    )


def test_mesh_axis_boxes_replicate_the_rank_axis():
    params = {
        "dense": {
            "kernel": nn.Partitioned(jnp.ones((8, 4)), names=(None, "model")),
            "bias": jnp.zeros(4),
        }
    }
    adapters = jlora.init(jax.random.key(0), params, LoraConfig(targets="dense/kernel", rank=2))
    f = adapters["dense"]["kernel"]
    assert isinstance(f, LoraFactors) and isinstance(f.a, nn.Partitioned)
    assert (f.a.names, f.b.names) == ((None, None), (None, "model"))


def test_a_rule_that_shards_the_rank_axis_is_refused():
    x, params = _setup(5)
    adapted = jlora.linen.lora(Block(), LoraConfig(targets="up/kernel", rank=2))
    adapters = adapted.init_adapters(jax.random.key(6), params, x)
    mesh = _mesh()
    rules = (*RULES, (RANK_AXIS, "data"))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(adapters), mesh, rules)
    assert isinstance(shardings["up"]["kernel"].a, NamedSharding)
    with pytest.raises(AdapterMismatchError, match=r"up/kernel: factor a .* shards the rank axis"):
        jlora.sharding.check_factor_shardings(adapters, shardings, mesh)


# logical_factor_shardings: Flax's mapping, with the checks Flax leaves out ------------------------


def _boxed_adapters(seed: int):
    x, params = _setup(seed)
    adapted = jlora.linen.lora(Block(), LoraConfig(targets=".*/kernel", rank=2))
    return adapted.init_adapters(jax.random.key(seed + 1), params, x)


def test_logical_factor_shardings_equal_flaxs_for_valid_rules():
    adapters = _boxed_adapters(7)
    mesh = _mesh()
    got = jlora.sharding.logical_factor_shardings(adapters, mesh, RULES)
    want = nn.logical_to_mesh_sharding(nn.get_partition_spec(adapters), mesh, RULES)
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert got["heads"]["kernel"].b.spec == P(None, "model", None)
    jlora.sharding.check_factor_shardings(adapters, got)
    with nn.logical_axis_rules(RULES):  # rules from Flax's context by default
        assert jax.tree.leaves(jlora.sharding.logical_factor_shardings(adapters, mesh)) == (
            jax.tree.leaves(got)
        )


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            (("embed", None), ("heads", "model"), ("kv", None)),  # no rule for "mlp"
            r"^heads/kernel: factor a has logical axis name 'mlp' \(names \('mlp', 'lora_rank'\)\), "
            r"which no rule maps; the rules name \['embed', 'heads', 'kv'\]\. Add a rule "
            r"\('mlp', <mesh axis>\)",
        ),
        (
            (*RULES, (RANK_AXIS, "data")),
            r"^DenseGeneral_0/kernel: factor a: the rule \('lora_rank', 'data'\) shards the rank "
            r"axis; .* Remove the rule or map 'lora_rank' to None",
        ),
        (
            (("embed", None), ("mlp", "tensor"), ("heads", "model"), ("kv", None)),
            r"^heads/kernel: factor a: logical axis 'mlp' maps to mesh axis 'tensor' \(rules .*\) but "
            r"the mesh has axes \('data', 'model'\); fix the rule or the mesh",
        ),
        (
            (("embed", None), ("mlp", None), ("heads", None), ("kv", "model")),
            r"^DenseGeneral_0/kernel: factor a: PartitionSpec P\(None, 'model', None\) splits axis "
            r"1 of shape \(4, 2, 2\) into 4 parts \(mesh axes 'model'\), which do not divide 2",
        ),
    ],
    ids=["name-without-rule", "rank-rule", "mesh-lacks-axis", "does-not-divide"],
)
def test_bad_logical_rules_name_the_path(rules, message):
    adapters = _boxed_adapters(8)
    with pytest.raises(AdapterMismatchError, match=message):
        jlora.sharding.logical_factor_shardings(adapters, _mesh(), rules)


def test_logical_factor_shardings_need_boxes_and_read_mesh_axis_names():
    params = {"w": jnp.zeros((8, 4))}
    plain = jlora.init(jax.random.key(0), params, LoraConfig(targets="w", rank=2))
    with pytest.raises(
        AdapterMismatchError,
        match=r"^w: factor a is a plain ArrayImpl, not boxed with axis names; .* "
        r"jlora.sharding.factor_shardings\(adapters, param_shardings\)",
    ):
        jlora.sharding.logical_factor_shardings(plain, _mesh(), RULES)
    boxed = {"w": nn.Partitioned(jnp.zeros((8, 4)), names=("data", "model"))}
    adapters = jlora.init(jax.random.key(0), boxed, LoraConfig(targets="w", rank=2))
    shardings = jlora.sharding.logical_factor_shardings(adapters, _mesh(), ())
    assert (shardings["w"].a.spec, shardings["w"].b.spec) == (P("data", None), P(None, "model"))
    boxed = {"w": nn.Partitioned(jnp.zeros((8, 4)), names=(None, "tensor"))}
    adapters = jlora.init(jax.random.key(0), boxed, LoraConfig(targets="w", rank=2))
    with pytest.raises(
        AdapterMismatchError,
        match=r"^w: factor b: PartitionSpec P\(None, 'tensor'\) names mesh axis 'tensor' but the "
        r"mesh has axes \('data', 'model'\)",
    ):
        jlora.sharding.logical_factor_shardings(adapters, _mesh(), ())


class ThreeNames(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, kernel_init=_logical(("embed", "mlp", "extra")))(x)


def test_boxed_names_that_disagree_with_the_weights_rank_are_refused():
    x = jnp.ones((2, 8))
    params = ThreeNames().init(jax.random.key(0), x)["params"]
    message = (
        r"^Dense_0/kernel: the weight is boxed \(LogicallyPartitioned\) with 3 logical axis names "
        r"\('embed', 'mlp', 'extra'\) but has 2 axes \(shape \(8, 4\)\); give one name \(or None\) "
        r"per axis"
    )
    with pytest.raises(AdapterMismatchError, match=message):
        jlora.init(jax.random.key(1), params, LoraConfig(targets=".*/kernel", rank=2))
    adapted = jlora.linen.lora(ThreeNames(), LoraConfig(targets=".*/kernel", rank=2))
    with pytest.raises(AdapterMismatchError, match=message):
        adapted.init_adapters(jax.random.key(1), params, x)
    # Fewer names than axes are a short PartitionSpec, as in Flax: the rest are replicated.
    short = {"w": nn.LogicallyPartitioned(jnp.zeros((8, 4)), names=("embed",))}
    adapters = jlora.init(jax.random.key(1), short, LoraConfig(targets="w", rank=2))
    assert adapters["w"].b.names == (RANK_AXIS, None)
