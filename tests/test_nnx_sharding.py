"""NNX sharding metadata: factors derive their names from the weight's, are created sharded under
the mesh, and stay sharded through split/merge, the optimizer, a jitted step and the merge; in
Auto and Explicit sharding modes, on a 2 x 4 mesh of fake CPU devices."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import abs_chain, assert_merge_within_roundoff, assert_within_roundoff, f64

import jlora
import jlora.nnx
from jlora import AdapterMismatchError, LoraConfig, TargetError
from jlora.nnx import LoraParam
from jlora.sharding import RANK_AXIS

R = RANK_AXIS
RULES = (
    ("batch", "data"),
    ("embed", "data"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
)
MODES = pytest.mark.parametrize("mode", ["auto", "explicit"])
INIT = nnx.initializers.lecun_normal()


def _mesh(mode: str = "auto") -> jax.sharding.Mesh:
    kind = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    return jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(kind,) * 2, devices=jax.devices()[:8]
    )


def _names(var) -> tuple:
    return tuple(var.get_metadata()["out_sharding"])


def _spec(mesh, var_or_array) -> P:
    """The array's PartitionSpec padded to its rank (jit may drop trailing Nones)."""
    x = var_or_array[...] if isinstance(var_or_array, nnx.Variable) else var_or_array
    spec = tuple(x.sharding.spec)
    assert x.sharding.mesh.shape_tuple == mesh.shape_tuple
    return P(*spec, *(None,) * (x.ndim - len(spec)))


class Transposed(nnx.Module):
    """A layer jlora does not know, with an ``(out, in)`` weight annotated directly."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(INIT(rngs.params(), (16, 8)), out_sharding=("mlp", "embed"))

    def __call__(self, x):
        return x @ self.w[...].T


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[nnx.Rngs], nnx.Module]
    weight: str
    a_names: tuple
    b_names: tuple
    layers: dict | None = None


def _part(names):
    return nnx.with_partitioning(INIT, names)


CASES = [
    Case(
        "Linear",
        lambda r: nnx.Linear(8, 16, kernel_init=_part(("embed", "mlp")), rngs=r),
        "kernel",
        ("embed", R),
        (R, "mlp"),
    ),
    Case(
        "LinearGeneral",
        lambda r: nnx.LinearGeneral(8, (4, 2), kernel_init=_part(("embed", "heads", "kv")), rngs=r),
        "kernel",
        ("embed", R),
        (R, "heads", "kv"),
    ),
    Case(
        "Einsum",
        lambda r: nnx.Einsum(
            "btd,ndh->btnh", (4, 8, 2), kernel_init=_part(("heads", "embed", "kv")), rngs=r
        ),
        "kernel",
        ("embed", R),
        (R, "heads", "kv"),
    ),
    Case(
        "Embed",
        lambda r: nnx.Embed(16, 8, embedding_init=_part(("vocab", "embed")), rngs=r),
        "embedding",
        ("vocab", R),
        (R, "embed"),
    ),
    Case(
        "Conv",
        lambda r: nnx.Conv(
            8,
            16,
            kernel_size=(3,),
            kernel_metadata={"out_sharding": (None, "embed", "mlp")},
            rngs=r,
        ),
        "kernel",
        (None, "embed", R),
        (R, "mlp"),
    ),
    Case(
        "CustomLayer",
        Transposed,
        "w",
        ("embed", R),
        (R, "mlp"),
        {Transposed: jlora.CustomLayer(param="w", layout="oi")},
    ),
]


def _logical_spec(names) -> P:
    rules = dict(RULES)
    return P(*(None if n == R else rules.get(n, n) for n in names))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_factors_derive_logical_names_and_are_created_sharded(case):
    mesh = _mesh()
    config = LoraConfig(targets=f".*{case.weight}", rank=2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        layer = case.build(nnx.Rngs(0))
        jlora.nnx.lora(layer, config, rngs=1, layers=case.layers)
        pspecs = nnx.get_partition_spec(nnx.state(layer, LoraParam))
    assert (_names(layer.lora_a), _names(layer.lora_b)) == (case.a_names, case.b_names)
    # The rank axis is replicated though the user's rules do not mention it.
    assert layer.lora_a.get_metadata()["sharding_rules"] == ((R, None),)
    for name, names in (("lora_a", case.a_names), ("lora_b", case.b_names)):
        want = _logical_spec(names)
        assert pspecs[name].get_value() == want, name
        assert _spec(mesh, getattr(layer, name)) == want, name
    # The weight itself is untouched.
    assert _spec(mesh, getattr(layer, case.weight)) == _logical_spec(
        _names(getattr(layer, case.weight))
    )


def test_mesh_axis_names_get_an_unnamed_rank_axis():
    mesh = _mesh()
    with jax.set_mesh(mesh):
        layer = nnx.Linear(8, 16, kernel_init=_part(("data", "model")), rngs=nnx.Rngs(0))
        jlora.nnx.lora(layer, LoraConfig(targets="kernel", rank=2), rngs=1)
    assert (_names(layer.lora_a), _names(layer.lora_b)) == (("data", None), (None, "model"))
    assert "sharding_rules" not in layer.lora_a.get_metadata()
    assert _spec(mesh, layer.lora_a) == P("data", None)
    assert _spec(mesh, layer.lora_b) == P(None, "model")


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(8, 8, kernel_init=_part(("embed", "mlp")), rngs=rngs)

    def __call__(self, x):
        return x + self.lin(x)


def test_stacked_layers_keep_the_stack_name_and_scan_slices_it():
    mesh = _mesh()
    rules = (*RULES, ("layers", None))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return Block(rngs)

        blocks = jlora.nnx.lora(make(nnx.Rngs(0)), LoraConfig(targets=".*kernel", rank=2), rngs=1)
        lin = blocks.lin
        assert (_names(lin.lora_a), _names(lin.lora_b)) == (
            ("layers", "embed", R),
            ("layers", R, "mlp"),
        )
        assert (_spec(mesh, lin.lora_a), _spec(mesh, lin.lora_b)) == (
            P(None, "data", None),
            P(None, None, "model"),
        )

        @nnx.jit
        def run(blocks, x):
            meta = {nnx.PARTITION_NAME: "layers"}

            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata=meta)
            def body(block, x):
                return block(x)

            return body(blocks, x)

        assert run(blocks, jnp.ones((4, 8), jnp.float32)).shape == (4, 8)
    assert _names(lin.lora_a) == ("layers", "embed", R)  # the scan put the stack name back


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, explicit: bool = False):
        self.up = nnx.Linear(8, 16, kernel_init=_part(("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(16, 8, kernel_init=_part(("mlp", "embed")), rngs=rngs)
        # In Explicit mode a contraction over a sharded axis needs its output sharding.
        self.out = P("data", None) if explicit else None

    def __call__(self, x):
        h = jax.nn.relu(self.up(x))
        return self.down(h, out_sharding=self.out) if self.out else self.down(h)


CONFIG = LoraConfig(targets=".*kernel", rank=2, alpha=4.0)


def _adapted_mlp(mesh, mode: str) -> MLP:
    """The MLP adapted under ``mesh`` with RULES, ``b`` set random (so the term is not zero)."""
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        model = MLP(nnx.Rngs(0), explicit=mode == "explicit")
        jlora.nnx.lora(model, CONFIG, rngs=1)
        for layer in (model.up, model.down):
            b = rng.standard_normal(layer.lora_b.shape).astype(np.float32)
            layer.lora_b[...] = jax.device_put(b, layer.lora_b[...].sharding)
    return model


def _factor_specs(mesh, model) -> dict:
    return {
        (n, f): _spec(mesh, getattr(getattr(model, n), f))
        for n in ("up", "down")
        for f in ("lora_a", "lora_b")
    }


WANT = {
    ("up", "lora_a"): P("data", None),
    ("up", "lora_b"): P(None, "model"),
    ("down", "lora_a"): P("model", None),
    ("down", "lora_b"): P(None, "data"),
}


@MODES
def test_split_merge_optimizer_step_and_merge_keep_shardings(mode):
    mesh = _mesh(mode)
    model = _adapted_mlp(mesh, mode)
    assert _factor_specs(mesh, model) == WANT
    graphdef, factors, rest = nnx.split(model, LoraParam, ...)
    assert _spec(mesh, factors["up"]["lora_a"]) == P("data", None)
    assert _factor_specs(mesh, nnx.merge(graphdef, factors, rest)) == WANT

    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8)), jnp.float32)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        x = jax.device_put(x, P("data", None))
        with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
            optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoraParam)
        moments = optimizer.opt_state[0]
        for moment in (moments.mu, moments.nu):
            assert {(n, f): _spec(mesh, moment[n][f]) for n, f in WANT} == WANT

        @nnx.jit
        def step(model, optimizer, x):
            def loss(model):
                return jnp.mean(model(x) ** 2)

            value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoraParam))(model)
            with jax.numpy_dtype_promotion("standard"):
                optimizer.update(model, grads)
            return value

        before = nnx.to_pure_dict(nnx.state(model, LoraParam))
        step(model, optimizer, x)
    after = nnx.to_pure_dict(nnx.state(model, LoraParam))
    assert not np.array_equal(before["up"]["lora_a"], after["up"]["lora_a"])  # it trained
    assert _factor_specs(mesh, model) == WANT
    moments = optimizer.opt_state[0]
    assert {(n, f): _spec(mesh, moments.mu[n][f]) for n, f in WANT} == WANT

    kernel = model.up.kernel
    merged = jlora.nnx.merge(model)
    assert type(merged.up) is nnx.Linear
    assert merged.up.kernel[...].sharding == kernel[...].sharding
    assert _names(merged.up.kernel) == ("embed", "mlp")
    assert_merge_within_roundoff(
        merged.up.kernel[...], kernel[...], jlora.nnx.to_adapters(model)["up"]["kernel"]
    )


def _reference(model: MLP, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The adapted MLP's output in float64, the float64 magnitude behind each element, and the
    longest chain of float32 roundings."""
    out, magnitude = f64(x), np.abs(f64(x))
    terms = 0
    for i, layer in enumerate((model.up, model.down)):
        w, bias = f64(layer.kernel[...]), f64(layer.bias[...])
        a, b = f64(layer.lora_a[...]), f64(layer.lora_b[...])
        s = layer.lora_a.get_metadata()["lora_scale"]
        out = out @ w + s * (out @ a) @ b + bias
        magnitude = abs_chain(magnitude, w) + abs_chain(magnitude, a, b, np.float64(s))
        magnitude = magnitude + np.abs(bias)
        terms += w.shape[0] + a.shape[1] + 4
        if i == 0:
            out = np.maximum(out, 0.0)
    return out, magnitude, terms


@MODES
def test_sharded_forward_equals_the_unsharded_float64_reference(mode):
    mesh = _mesh(mode)
    model = _adapted_mlp(mesh, mode)
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        y = nnx.jit(lambda m, x: m(x))(model, jax.device_put(x, P("data", None)))
    if mode == "explicit":  # in Auto mode the compiler chooses
        assert _spec(mesh, y) == P("data", None)
    want, magnitude, terms = _reference(model, x)
    assert_within_roundoff(y, want, magnitude, terms=terms)


@pytest.mark.parametrize("eager", [True, False])
def test_the_standard_sharded_nnx_recipe_shards_the_factors(eager):
    mesh = _mesh()

    @nnx.jit
    def create():
        model = MLP(nnx.Rngs(0))
        jlora.nnx.lora(model, CONFIG, rngs=1)
        state = nnx.state(model)
        pspecs = nnx.get_partition_spec(state)
        nnx.update(model, jax.lax.with_sharding_constraint(state, pspecs))
        return model

    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES), nnx.use_eager_sharding(eager):
        model = create()
    assert _factor_specs(mesh, model) == WANT
    assert _spec(mesh, model.up.kernel) == P("data", "model")


def test_factors_of_a_weight_on_a_mesh_are_placed_there_outside_the_mesh_context():
    mesh = _mesh()
    with jax.set_mesh(mesh):
        layer = nnx.Linear(8, 16, kernel_init=_part(("data", "model")), rngs=nnx.Rngs(0))
    jlora.nnx.lora(layer, LoraConfig(targets="kernel", rank=2), rngs=1)  # no mesh in context
    assert (_spec(mesh, layer.lora_a), _spec(mesh, layer.lora_b)) == (
        P("data", None),
        P(None, "model"),
    )
    jlora.nnx.set_adapters(layer, jlora.nnx.to_adapters(layer))  # to_state places them alike
    assert _spec(mesh, layer.lora_b) == P(None, "model")


def test_a_weight_without_metadata_on_a_named_sharding_gets_derived_shardings():
    mesh = _mesh()
    layer = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
    layer.kernel[...] = jax.device_put(layer.kernel[...], NamedSharding(mesh, P("data", "model")))
    jlora.nnx.lora(layer, LoraConfig(targets="kernel", rank=2), rngs=1)
    assert "out_sharding" not in layer.lora_a.get_metadata()
    assert (_spec(mesh, layer.lora_a), _spec(mesh, layer.lora_b)) == (
        P("data", None),
        P(None, "model"),
    )


def test_names_that_disagree_with_the_weight_rank_name_the_path():
    mesh = _mesh()
    with jax.set_mesh(mesh):
        model = nnx.Sequential(
            nnx.Linear(8, 16, kernel_metadata={"out_sharding": ("data",)}, rngs=nnx.Rngs(0))
        )
    with pytest.raises(
        TargetError,
        match=r"layers/0/kernel: the weight's sharding metadata out_sharding=\('data',\) has 1 "
        r"axis names but the weight has 2 axes \(shape \(8, 16\)\); give one name \(or None\) "
        r"per weight axis",
    ):
        jlora.nnx.lora(model, LoraConfig(targets=".*kernel", rank=2), rngs=1)
    assert not hasattr(model.layers[0], "lora_a")  # nothing was adapted


def test_a_rule_that_shards_the_rank_axis_is_refused():
    mesh = _mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        model = nnx.Sequential(MLP(nnx.Rngs(0)))
    with (
        nnx.logical_axis_rules((*RULES, (R, "model"))),
        pytest.raises(
            AdapterMismatchError,
            match=r"layers/0/down/kernel: a logical-axis rule maps the LoRA rank axis 'lora_rank' "
            r"to mesh axis 'model'.*jlora.sharding.check_factor_shardings",
        ),
    ):
        jlora.nnx.lora(model, LoraConfig(targets=".*down/kernel", rank=2), rngs=1)


def test_dora_magnitudes_get_b_names_less_the_rank_axis():
    from jlora.variants import dora_nnx

    mesh = _mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        layer = nnx.Linear(8, 16, kernel_init=_part(("embed", "mlp")), rngs=nnx.Rngs(0))
        dora_nnx(jlora.nnx.lora(layer, LoraConfig(targets="kernel", rank=2), rngs=1))
    m = layer.lora_magnitude
    assert _names(m) == ("mlp",) and m.get_metadata()["sharding_rules"] == ((R, None),)
    assert _spec(mesh, m) == P("model") and _spec(mesh, layer.lora_b) == P(None, "model")
    with jax.set_mesh(mesh):  # mesh-axis names: no rules
        plain = nnx.Linear(8, 16, kernel_init=_part(("data", "model")), rngs=nnx.Rngs(0))
        dora_nnx(jlora.nnx.lora(plain, LoraConfig(targets="kernel", rank=2), rngs=1))
    assert _names(plain.lora_magnitude) == ("model",)
    assert _spec(mesh, plain.lora_magnitude) == P("model")
