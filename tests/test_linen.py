import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from models_linen import CNN, MLP, cases, random_variables
from trees import random_factors

import jlora
import jlora.linen
from jlora import AdapterMismatchError, LoraConfig, MissingRngError, TargetError

CASES = {c.name: c for c in cases()}


def _split(variables):
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def _close(got, want):
    """Float32 agreement of two programs' model outputs, relative to the output's magnitude.

    A whole model has no float64 twin here, so the scale is the output's own; the LoRA terms
    these tests look for move outputs by > 0.1, some ten thousand times the tolerance.
    """
    atol = 1e-5 * max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


@dataclasses.dataclass
class Zoo:
    """One zoo model set up once per test module: params, adapters, jitted forwards, training."""

    case: object
    adapted: jlora.linen.LoraModel
    params: dict
    rest: dict
    adapters: dict
    trained_like: dict  # random non-zero factors, as after training
    apply: object  # jitted (params, adapters, variables) -> adapted eval output
    base: object  # jitted (variables) -> base eval output
    merged: object  # jitted (params, adapters, variables) -> eval output of the merged model
    _training: dict = dataclasses.field(default_factory=dict)

    def training(self):
        if not self._training:
            self._training.update(_train(self))
        return self._training


@functools.cache
def _build(name: str) -> Zoo:
    case = CASES[name]
    params, rest = _split(random_variables(case.model, case.x))
    adapted = jlora.linen.lora(case.model, case.config)
    adapters = adapted.init_adapters(jax.random.key(1), params, case.x, variables=rest)
    trained_like = jax.tree.map(lambda t: 0.3 * t, random_factors(adapters))
    apply = jax.jit(lambda p, a, v: adapted.apply(p, a, case.x, variables=v))
    base = jax.jit(lambda v: case.model.apply(v, case.x))
    merged = jax.jit(lambda p, a, v: case.model.apply({"params": jlora.merge(p, a), **v}, case.x))
    return Zoo(case, adapted, params, rest, adapters, trained_like, apply, base, merged)


@pytest.fixture(scope="module", params=list(CASES))
def zoo(request) -> Zoo:
    return _build(request.param)


# Forward: init is the identity, factored equals merged -----------------------------------------


def test_layouts_come_from_the_module_kinds(zoo):
    inferred = zoo.adapted.infer_layouts(zoo.params, zoo.case.x, variables=zoo.rest)
    assert {p: s for p, s in inferred.items() if p in zoo.case.layouts} == zoo.case.layouts
    for path, spec in zoo.case.layouts.items():
        f = zoo.adapters
        for key in path.split("/"):
            f = f[key]
        assert f.layout == jlora.Layout.parse(spec)


def test_adapted_output_at_init_equals_base(zoo):
    got = zoo.apply(zoo.params, zoo.adapters, zoo.rest)
    # Exact within one compiled program: at init (b = 0, or a = 0 for embedding tables) each LoRA
    # term is an exact zero added to the base layer's output, as with all-zero factors.
    zeros = jax.tree.map(jnp.zeros_like, zoo.adapters)
    np.testing.assert_array_equal(got, zoo.apply(zoo.params, zeros, zoo.rest))
    # The base model alone is another program, which XLA may fuse (or merge x W0 with x a into
    # one wider dot) differently: equal to round-off.
    _close(got, zoo.base({"params": zoo.params, **zoo.rest}))


def test_factored_output_equals_merged_model(zoo):
    got = zoo.apply(zoo.params, zoo.trained_like, zoo.rest)
    want = zoo.merged(zoo.params, zoo.trained_like, zoo.rest)
    _close(got, want)
    assert np.max(np.abs(want - zoo.base({"params": zoo.params, **zoo.rest}))) > 0.1


# Training ---------------------------------------------------------------------------------------


def _train(zoo: Zoo, steps: int = 12) -> dict:
    case, adapted = zoo.case, zoo.adapted
    tx = optax.adam(3e-2)
    traces = []

    def step(adapters, opt_state, params, rest, key):
        traces.append(None)  # runs once per trace

        def loss_fn(adapters):
            kwargs = {"rngs": {"dropout": key}, "lora_train": True, **case.train_kwargs}
            if case.mutable:
                out, updated = adapted.apply(
                    params, adapters, case.x, variables=rest, mutable=list(case.mutable), **kwargs
                )
            else:
                out, updated = (
                    adapted.apply(params, adapters, case.x, variables=rest, **kwargs),
                    rest,
                )
            return case.loss(out, case.y), updated

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
            updates, opt_state = tx.update(grads, opt_state, adapters)
            adapters = optax.apply_updates(adapters, updates)
        return adapters, opt_state, rest, loss, grads

    jitted = jax.jit(step)
    before = jax.tree.map(np.array, zoo.params)
    adapters, rest = zoo.adapters, zoo.rest
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(adapters)
    losses, first_grads = [], None
    for i in range(steps):
        adapters, opt_state, rest, loss, grads = jitted(
            adapters, opt_state, zoo.params, rest, jax.random.key(i)
        )
        losses.append(float(loss))
        first_grads = grads if first_grads is None else first_grads
    # A different adapter of the same shapes must reuse the compiled step.
    jitted(zoo.trained_like, opt_state, zoo.params, rest, jax.random.key(0))
    n_traces = len(traces)
    jaxpr = jax.make_jaxpr(step)(adapters, opt_state, zoo.params, rest, jax.random.key(0))
    return {
        "losses": losses,
        "first_grads": first_grads,
        "last_grads": grads,
        "adapters": adapters,
        "before": before,
        "traces": n_traces,
        "jaxpr": jaxpr,
    }


def test_gradients_reach_the_factors_only(zoo):
    result = zoo.training()
    assert jax.tree.structure(result["first_grads"]) == jax.tree.structure(zoo.adapters)
    # b = 0 at init (a = 0 for embedding tables), so only the other factor moves on step 1.
    for f, g in zip(
        jlora._merge.factors_by_path(zoo.adapters).values(),
        jlora._merge.factors_by_path(result["first_grads"]).values(),
        strict=True,
    ):
        zero, moving = (g.b, g.a) if f.layout.embedding else (g.a, g.b)
        assert not np.any(zero) and np.any(moving)
    assert all(np.any(g) for g in jax.tree.leaves(result["last_grads"]))


def test_training_leaves_the_base_bit_identical_and_the_loss_falls(zoo):
    result = zoo.training()
    for x, y in zip(jax.tree.leaves(result["before"]), jax.tree.leaves(zoo.params), strict=True):
        np.testing.assert_array_equal(x, y)  # exact: the frozen base is never written
    losses = result["losses"]
    assert losses[-1] < 0.8 * losses[0], losses


def test_jitted_step_compiles_once_across_adapters(zoo):
    assert zoo.training()["traces"] == 1


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_train_step_never_materialises_a_weight_sized_product(zoo):
    kernel_shapes = zoo.case.kernel_shapes(zoo.params)
    dots = [e for e in _eqns(zoo.training()["jaxpr"].jaxpr) if e.primitive.name == "dot_general"]
    assert dots, "expected the step to contain matrix products"
    made = {tuple(v.aval.shape) for e in dots for v in e.outvars}
    assert made.isdisjoint(kernel_shapes), made & kernel_shapes


def test_the_materialisation_check_catches_a_merge_per_step(zoo):
    def merged_per_step(adapters):
        variables = {"params": jlora.merge(zoo.params, adapters), **zoo.rest}
        return zoo.case.loss(zoo.case.model.apply(variables, zoo.case.x), zoo.case.y)

    jaxpr = jax.make_jaxpr(jax.grad(merged_per_step))(zoo.adapters)
    dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    made = {tuple(v.aval.shape) for e in dots for v in e.outvars}
    assert made & zoo.case.kernel_shapes(zoo.params)


# Layer kinds and their options ------------------------------------------------------------------


def _adapt(model, x, targets=".*kernel", rank=2, **kwargs):
    params = random_variables(model, x)["params"]
    adapted = jlora.linen.lora(model, LoraConfig(targets=targets, rank=rank, alpha=3.0))
    adapters = adapted.init_adapters(jax.random.key(0), params, x, **kwargs)
    return adapted, params, jax.tree.map(lambda t: 0.3 * t, random_factors(adapters))


def _check_against_merged(model, x, targets=".*kernel", method=None, rank=2):
    adapted, params, factors = _adapt(model, x, targets, rank, method=method)
    got = jax.jit(lambda p, f: adapted.apply(p, f, x, method=method))(params, factors)
    want = jax.jit(lambda p, f: model.apply({"params": jlora.merge(p, f)}, x, method=method))(
        params, factors
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _close(g, w)
    return adapted.infer_layouts(params, x, method=method)


class Parallel(nn.Module):
    """Runs every submodule on the same input and returns all outputs."""

    layers: tuple

    @nn.compact
    def __call__(self, x):
        return tuple(layer(x) for layer in self.layers)


def test_dense_general_axes_and_batch_dims():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 6)), jnp.float32)
    model = Parallel(
        (
            nn.DenseGeneral((3, 4), axis=1),
            nn.DenseGeneral(7, axis=(0, 2)),
            nn.DenseGeneral((2, 4), axis=-1, batch_dims=(0,)),
        )
    )
    layouts = _check_against_merged(model, x)
    assert layouts == {
        "layers_0/kernel": "ioo",  # axis=1
        "layers_1/kernel": "iio",  # axis=(0, 2)
        "layers_2/kernel": "sioo",  # batch_dims are stack axes
    }


def test_einsum_equations():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 6)), jnp.float32)
    model = Parallel(
        (
            nn.Einsum((6, 2, 4), "btd,dhk->bthk"),
            nn.Einsum((6, 5), "...d,dk->...k"),
            nn.Einsum((3, 6, 5), "btd,tdk->kb"),
            nn.Einsum((6, 5), "btd,dk->bk"),
        )
    )
    layouts = _check_against_merged(model, x)
    assert layouts == {
        "layers_0/kernel": "ioo",
        "layers_1/kernel": "io",
        "layers_2/kernel": "iio",
        "layers_3/kernel": "io",
    }


def test_conv_geometry():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 8, 3)), jnp.float32)
    convs = [
        nn.Conv(4, (3, 3), padding="SAME", strides=(2, 1)),
        nn.Conv(4, (3, 2), padding="VALID", kernel_dilation=(1, 2)),
        nn.Conv(4, (3, 3), padding=1, input_dilation=2),
        nn.Conv(4, (3, 3), padding=[(1, 0), 2]),
        nn.Conv(4, (3, 3), padding="CIRCULAR", kernel_dilation=2),
        nn.Conv(4, (2, 3), padding="REFLECT"),
    ]
    layouts = _check_against_merged(Parallel(tuple(convs)), x)
    assert set(layouts.values()) == {"iiio"}
    seq = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 7, 3)), jnp.float32)
    causal = Parallel((nn.Conv(5, (3,), padding="CAUSAL", kernel_dilation=2),))
    assert _check_against_merged(causal, seq) == {"layers_0/kernel": "iio"}  # 2 batch axes
    unbatched = Parallel((nn.Conv(5, (3,), padding="VALID"),))
    assert _check_against_merged(unbatched, seq[0, 0]) == {"layers_0/kernel": "iio"}


def test_embed_lookup_attend_and_one_row_table():
    ids = jnp.array([[0, 3, 4], [1, 1, 2]])
    layouts = _check_against_merged(nn.Embed(5, 6), ids, targets="embedding")
    assert layouts == {"embedding": "vo"}
    query = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6)), jnp.float32)
    adapted, params, factors = _adapt(nn.Embed(5, 6), ids, targets="embedding")
    got = adapted.apply(params, factors, query, method="attend")
    merged = jlora.merge(params, factors)
    _close(got, nn.Embed(5, 6).apply({"params": merged}, query, method="attend"))
    _check_against_merged(nn.Embed(1, 3), ids, targets="embedding", rank=1)


def test_bfloat16_layer_computes_in_its_dtype():
    model = nn.Dense(5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.ones((4, 6), jnp.bfloat16)
    adapted, params, factors = _adapt(model, x)
    got = adapted.apply(params, factors, x)
    assert got.dtype == jnp.bfloat16 and factors["kernel"].a.dtype == jnp.float32
    want = model.apply({"params": jlora.merge(params, factors)}, x)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), 0.05, 0.05
    )


# Collections, rng streams and dropout -----------------------------------------------------------


class Counted(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        calls = self.variable("cache", "calls", jnp.zeros, (), jnp.int32)
        calls.value = calls.value + 1
        return nn.Dense(x.shape[-1], name="dense")(x), None


class ScannedCounter(nn.Module):
    split_dropout: bool = True

    @nn.compact
    def __call__(self, x):
        rngs = {"params": True, "dropout": True} if self.split_dropout else {"params": True}
        layers = nn.scan(
            Counted, variable_axes={"params": 0, "cache": 0}, split_rngs=rngs, length=2
        )
        return layers(name="layers")(x, None)[0]


def test_other_collections_and_mutable_through_scan():
    model = ScannedCounter()
    x = jnp.ones((3, 4))
    params, rest = _split(random_variables(model, x))
    adapted, _, factors = _adapt(model, x)
    out, state = jax.jit(lambda p, f: adapted.apply(p, f, x, variables=rest, mutable=["cache"]))(
        params, factors
    )
    want, want_state = jax.jit(
        lambda p, f: model.apply({"params": jlora.merge(p, f), **rest}, x, mutable=["cache"])
    )(params, factors)
    _close(out, want)
    assert set(state) == {"cache"}
    np.testing.assert_array_equal(state["cache"]["layers"]["calls"], [1, 1])
    np.testing.assert_array_equal(want_state["cache"]["layers"]["calls"], [1, 1])
    _, everything = adapted.apply(params, factors, x, variables=rest, mutable=True)
    assert jax.tree.structure(everything["params"]) == jax.tree.structure(params)


def _identity_dense(rate):
    """A Dense whose adapter adds drop(x) exactly: a = b = I, scale 1."""
    model = nn.Dense(6)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(400, 6)), jnp.float32)
    params = random_variables(model, x)["params"]
    adapted = jlora.linen.lora(model, LoraConfig(targets="kernel", rank=6, dropout=rate))
    eye = jlora.LoraFactors(jnp.eye(6), jnp.eye(6), 1.0, jlora.Layout(1, 1))
    return model, adapted, params, {"kernel": eye}, x


def test_lora_dropout_drops_the_adapter_input_in_train_mode_only():
    model, adapted, params, adapters, x = _identity_dense(0.25)
    base = model.apply({"params": params}, x)
    term_eval = adapted.apply(params, adapters, x, rngs={"dropout": jax.random.key(0)}) - base
    np.testing.assert_allclose(term_eval, x, rtol=1e-5, atol=1e-5)
    train = jax.jit(
        lambda key: adapted.apply(params, adapters, x, rngs={"dropout": key}, lora_train=True)
    )
    term = np.asarray(train(jax.random.key(0)) - base, np.float64)
    scaled = np.asarray(x, np.float64) / 0.75
    kept = np.abs(term - scaled) < np.abs(term)
    np.testing.assert_allclose(term[kept], scaled[kept], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(term[~kept], 0.0, atol=1e-5)
    assert 0.2 < 1 - kept.mean() < 0.3
    np.testing.assert_array_equal(train(jax.random.key(0)), train(jax.random.key(0)))  # 1 program
    assert not np.array_equal(train(jax.random.key(0)), train(jax.random.key(1)))


def test_lora_dropout_leaves_the_models_own_dropout_masks_alone():
    mlp = _build("mlp")
    rngs = {"dropout": jax.random.key(3)}
    got = jax.jit(
        lambda p, a: mlp.adapted.apply(p, a, mlp.case.x, train=True, rngs=rngs, lora_train=True)
    )(mlp.params, mlp.adapters)
    want = jax.jit(lambda p: MLP().apply({"params": p}, mlp.case.x, train=True, rngs=rngs))(
        mlp.params
    )
    # b = 0, so only a changed mask could differ by more than round-off (two programs): a unit
    # dropped in one and kept in the other moves the output by O(1).
    _close(got, want)


def test_missing_rng_in_train_mode():
    _, adapted, params, adapters, x = _identity_dense(0.1)
    with pytest.raises(
        MissingRngError,
        match=r"LoRA dropout is 0.1 and lora_train=True, but rngs has no 'dropout' key; pass "
        r"rngs=\{'dropout': key\}",
    ):
        adapted.apply(params, adapters, x, lora_train=True)
    adapted.apply(params, adapters, x)  # evaluation needs no rng
    custom = dataclasses.replace(adapted, rng_stream="lora")
    with pytest.raises(MissingRngError, match=r"rngs has no 'lora' key"):
        custom.apply(params, adapters, x, rngs={"dropout": jax.random.key(0)}, lora_train=True)
    custom.apply(params, adapters, x, rngs={"lora": jax.random.key(0)}, lora_train=True)


def test_missing_rng_inside_scan_names_the_module():
    model = ScannedCounter(split_dropout=False)
    x = jnp.ones((3, 4))
    params, rest = _split(random_variables(model, x))
    adapted = jlora.linen.lora(model, LoraConfig(targets=".*kernel", rank=2, dropout=0.1))
    adapters = adapted.init_adapters(jax.random.key(0), params, x, variables=rest)
    with pytest.raises(
        MissingRngError,
        match=r"layers/dense/kernel: LoRA dropout is 0.1 \(train mode\) but the module at "
        r"'layers/dense' has no 'dropout' rng stream. Inside nn.scan / nn.vmap, list it in "
        r"split_rngs",
    ):
        adapted.apply(
            params,
            adapters,
            x,
            variables=rest,
            mutable=["cache"],
            rngs={"dropout": jax.random.key(0)},
            lora_train=True,
        )


def test_batch_stats_update_like_the_merged_model():
    cnn = _build("cnn")
    x, rest, kwargs = cnn.case.x, cnn.rest, {"mutable": ["batch_stats"], "train": True}
    out, state = jax.jit(lambda p, f: cnn.adapted.apply(p, f, x, variables=rest, **kwargs))(
        cnn.params, cnn.trained_like
    )
    want, want_state = jax.jit(
        lambda p, f: CNN().apply({"params": jlora.merge(p, f), **rest}, x, **kwargs)
    )(cnn.params, cnn.trained_like)
    _close(out, want)
    for g, w in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
        _close(g, w)
    assert not np.allclose(state["batch_stats"]["bn"]["mean"], rest["batch_stats"]["bn"]["mean"])


# Bad input --------------------------------------------------------------------------------------


class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="dense")(nn.LayerNorm(name="norm")(x))


class Custom(nn.Module):
    """A layer jlora does not know: a bare matrix parameter."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 3))


class Optional(nn.Module):
    @nn.compact
    def __call__(self, x, both: bool = True):
        x = nn.Dense(4, name="first")(x)
        return nn.Dense(4, name="second")(x) if both else x


class ReadsTable(nn.Module):
    def setup(self):
        self.embed = nn.Embed(7, 4)

    def __call__(self, x):
        return x @ self.embed.embedding.T


X4 = jnp.ones((2, 4))


def _init_adapters(model, x, targets, **config):
    params = random_variables(model, x)["params"]
    adapted = jlora.linen.lora(model, LoraConfig(targets=targets, rank=2, **config))
    return adapted.init_adapters(jax.random.key(0), params, x)


@pytest.mark.parametrize(
    ("model", "x", "target", "message"),
    [
        (
            Normed(),
            X4,
            "norm/scale",
            r"norm/scale: the module at 'norm' is a nn.LayerNorm, which jlora.linen cannot "
            r"adapt; it adapts nn.Dense, nn.DenseGeneral and nn.Einsum \(their 'kernel'\), "
            r"nn.Conv \('kernel'\) and nn.Embed \('embedding', for lookups and attend\)",
        ),
        (
            Normed(),
            X4,
            "dense/bias",
            r"dense/bias: the module at 'dense' is an nn.Dense, whose only adaptable weight is "
            r"'kernel', not 'bias'",
        ),
        (Custom(), X4, "w", r"w: the root module is a test_linen.Custom, which jlora.linen"),
        (
            nn.Conv(4, (3,), feature_group_count=2),
            jnp.ones((1, 5, 4)),
            "kernel",
            r"kernel: nn.Conv with feature_group_count=2: a grouped \(or depthwise\) kernel",
        ),
        (
            nn.Conv(4, (3,), mask=jnp.ones((3, 4, 4))),
            jnp.ones((1, 5, 4)),
            "kernel",
            r"kernel: nn.Conv with a mask",
        ),
        (
            nn.Einsum((4, 3), "bd,dk->b"),
            X4,
            "kernel",
            r"kernel: einsum 'bd,dk->b': kernel letter\(s\) \['k'\] are summed away",
        ),
        (
            nn.Einsum((4, 3), "bd,dk->bdk"),
            X4,
            "kernel",
            r"kernel: einsum 'bd,dk->bdk': its kernel letters 'dk' are 'so' .* needs at least "
            r"one contracted letter",
        ),
        (
            ReadsTable(),
            X4,
            "embed/embedding",
            r"embed/embedding: the module at 'embed' \(nn.Embed\) ran, but not through __call__ "
            r"or attend: the model reads its 'embedding' directly",
        ),
    ],
)
def test_targets_jlora_cannot_adapt(model, x, target, message):
    with pytest.raises(TargetError, match=message):
        _init_adapters(model, x, target)


def test_target_on_a_weight_the_example_call_does_not_use():
    model = Optional()
    params = random_variables(model, X4)["params"]
    adapted = jlora.linen.lora(model, LoraConfig(targets=".*kernel", rank=2))
    with pytest.raises(
        TargetError,
        match=r"second/kernel: no module used this weight when the model ran on the example "
        r"inputs; pass inputs \(and method=\) that run it",
    ):
        adapted.init_adapters(jax.random.key(0), params, X4, both=False)
    adapters = adapted.init_adapters(jax.random.key(0), params, X4, both=True)
    # Running part of the model leaves the other adapters unused, which is fine. Exact: eager,
    # so both run the same ops on the same shapes, and b = 0 adds an exact zero.
    np.testing.assert_array_equal(
        adapted.apply(params, adapters, X4, both=False),
        model.apply({"params": params}, X4, both=False),
    )


def test_not_a_linen_module():
    config = LoraConfig(targets="kernel")
    with pytest.raises(
        TypeError, match=r"got the class Dense; pass an instance, e.g. Dense\(\.\.\.\)"
    ):
        jlora.linen.lora(nn.Dense, config)
    with pytest.raises(TypeError, match=r"got dict; pass the nn.Module you call .init and .apply"):
        jlora.linen.lora({"kernel": X4}, config)
    from flax import nnx

    with pytest.raises(TypeError, match=r"got the flax.nnx object Linear; use jlora.nnx"):
        jlora.linen.lora(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), config)
    with pytest.raises(TypeError, match=r"expected a jlora.LoraConfig, got dict"):
        jlora.linen.lora(nn.Dense(3), {"targets": "kernel"})


def test_adapters_from_another_model():
    small = MLP(hidden=20)
    params = random_variables(small, CASES["mlp"].x)["params"]
    adapted = jlora.linen.lora(small, CASES["mlp"].config)
    other = _init_adapters(MLP(), CASES["mlp"].x, r"(up|mid|head)/kernel")
    with pytest.raises(
        AdapterMismatchError,
        match=r"head/kernel: adapter factors a \(24, 2\), b \(2, 5\) do not fit the weight of "
        r"shape \(20, 5\); expected a \(20, 2\), b \(2, 5\)",
    ):
        adapted.apply(params, other, CASES["mlp"].x)
    with pytest.raises(
        AdapterMismatchError,
        match=r"nope/kernel: the adapters have factors at this path but the params have no such "
        r"weight",
    ):
        adapted.apply(params, {"nope": {"kernel": other["up"]["kernel"]}}, CASES["mlp"].x)


def test_adapters_with_a_wrong_layout_or_on_an_unknown_layer():
    model = nn.DenseGeneral((2, 3))
    params = random_variables(model, X4)["params"]
    wrong = jlora.init(
        jax.random.key(0), params, LoraConfig(targets="kernel", rank=2, layouts={"kernel": "iio"})
    )
    with pytest.raises(
        AdapterMismatchError,
        match=r"kernel: the adapter's layout is 'iio' but this nn.DenseGeneral weight's is "
        r"'ioo'; the adapters were made with a wrong layout",
    ):
        jlora.linen.lora(model, LoraConfig(targets="kernel")).apply(params, wrong, X4)
    params = random_variables(Custom(), X4)["params"]
    adapters = jlora.init(jax.random.key(0), params, LoraConfig(targets="w", rank=2))
    with pytest.raises(
        AdapterMismatchError,
        match=r"w: adapters here cannot be applied: the root module is a test_linen.Custom",
    ):
        jlora.linen.lora(Custom(), LoraConfig(targets="w")).apply(params, adapters, X4)


def test_variables_must_not_hold_params():
    model = nn.Dense(3)
    params = random_variables(model, X4)["params"]
    adapted = jlora.linen.lora(model, LoraConfig(targets="kernel", rank=2))
    adapters = adapted.init_adapters(jax.random.key(0), params, X4)
    with pytest.raises(ValueError, match=r"variables= takes the collections other than 'params'"):
        adapted.apply(params, adapters, X4, variables={"params": params})
