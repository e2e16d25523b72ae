import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models_nnx import MLP, ZOO, Decoder, ScannedDecoder, materialise
from trees import random_factors

import jlora
import jlora.nnx
from jlora import AdapterMismatchError, LoraConfig, MissingRngError, TargetError
from jlora.nnx import LoraParam

CASES = pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
_BUILT: dict[str, nnx.Module] = {}


def _case(name: str):
    return next(c for c in ZOO if c.name == name)


def _build(case) -> nnx.Module:
    """A fresh copy of the zoo model (built once per session)."""
    if case.name not in _BUILT:
        _BUILT[case.name] = materialise(case.build)
    return nnx.clone(_BUILT[case.name])


@nnx.jit
def _jitted(model, x):
    return model(x)


def _forward(model, x):
    """The model's output: op by op (each primitive compiles once per shape and is reused across
    models), except for models that scan over layers, whose scan would recompile on every call."""
    return _jitted(model, x) if isinstance(model, (ScannedDecoder, _Stack)) else model(x)


def _pure(model, kind=nnx.Param) -> dict:
    return nnx.to_pure_dict(nnx.state(model, kind))


def _assert_trees_equal(x, y) -> None:
    flat_x, tree_x = jax.tree.flatten(x)
    flat_y, tree_y = jax.tree.flatten(y)
    assert tree_x == tree_y
    for a, b in zip(flat_x, flat_y, strict=True):
        np.testing.assert_array_equal(a, b)


def _config(case, **kwargs) -> LoraConfig:
    return LoraConfig(targets=case.targets, rank=2, alpha=2.0, **kwargs)


def _adapted(case):
    """The zoo model adapted (eval mode), its batch and its base output."""
    model = _build(case)
    model.eval()
    x = jnp.asarray(case.batch(np.random.default_rng(0)))
    y0 = _forward(model, x)
    jlora.nnx.lora(model, _config(case), rngs=1)
    return model, x, y0


def _randomise(model, seed=1, scale=0.2):
    adapters = jax.tree.map(lambda t: scale * t, random_factors(jlora.nnx.to_adapters(model), seed))
    jlora.nnx.set_adapters(model, adapters)
    return adapters


@CASES
def test_init_equals_base_and_keeps_param_paths(case):
    model = _build(case)
    model.eval()
    x = jnp.asarray(case.batch(np.random.default_rng(0)))
    y0, params0 = model(x), _pure(model)
    jlora.nnx.lora(model, _config(case), rngs=1)
    y = model(x)
    if isinstance(model, ScannedDecoder):
        # nnx.scan compiles its body: the adapted body is another program than the base's, which
        # XLA may fuse differently, so equal to round-off (a LoRA term moves it by > 1%).
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5 * float(np.abs(y0).max()))
    else:
        # Exact: eager, so both runs execute the very same base operations on the same shapes,
        # and b = 0 (a = 0 for embedding tables) adds an exact zero.
        np.testing.assert_array_equal(y, y0)
    _assert_trees_equal(_pure(model), params0)  # same paths, same values
    adapters = jlora.nnx.to_adapters(model)
    assert len(jlora._merge.factors_by_path(adapters)) == case.n_adapted
    # the functional core accepts the NNX params and adapters as they are
    _assert_trees_equal(jlora.merge(params0, adapters), params0)
    # Exact in every case: the same operations with all-zero factors give the same output.
    jlora.nnx.set_adapters(model, jax.tree.map(jnp.zeros_like, adapters))
    np.testing.assert_array_equal(model(x), y)


@CASES
def test_factored_equals_merged_plain_model(case):
    model, x, y0 = _adapted(case)
    base = _build(case)
    base.eval()
    graphdef0 = nnx.graphdef(base)
    params0 = _pure(model)
    adapters = _randomise(model)
    y = _forward(model, x)
    merged = jlora.nnx.merge(model)
    y_merged = _forward(merged, x)
    scale = float(np.abs(y_merged).max())
    change = float(np.abs(np.asarray(y) - y0).max())
    assert change > 0.01 * scale  # the factors do change the output
    np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=2e-6 * scale)
    # a plain model: the base graph (classes, attributes) and no factors left
    assert nnx.graphdef(merged) == graphdef0
    assert _pure(merged, LoraParam) == {}
    # the weights are exactly the functional merge (nnx.merge runs jlora.merge's very ops), and
    # the adapted model is untouched (exact: the same program on the same values)
    _assert_trees_equal(_pure(merged), jlora.merge(params0, adapters))
    _assert_trees_equal(_pure(model), params0)
    np.testing.assert_array_equal(_forward(model, x), y)


@CASES
def test_state_round_trip_is_exact(case):
    model, x, _ = _adapted(case)
    adapters = _randomise(model, seed=3)
    _assert_trees_equal(jlora.nnx.to_adapters(model), adapters)
    graphdef, factors, rest = nnx.split(model, LoraParam, ...)
    assert all(isinstance(v, LoraParam) for v in jax.tree.leaves(factors, is_leaf=_is_var))
    assert not any(isinstance(v, LoraParam) for v in jax.tree.leaves(rest, is_leaf=_is_var))
    _assert_trees_equal(jlora.nnx.to_adapters(factors), adapters)
    _assert_trees_equal(jlora.nnx.to_state(model, adapters), factors)
    rebuilt = nnx.merge(graphdef, jlora.nnx.to_state(model, adapters), rest)
    # Exact: the same graph and values, so the same operations (or the same jitted program).
    np.testing.assert_array_equal(_forward(rebuilt, x), _forward(model, x))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _train_step():
    traces = []

    @nnx.jit
    def step(model, optimizer, x, target):
        traces.append(None)

        def loss_fn(model):
            return jnp.mean((model(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoraParam))(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            optimizer.update(model, grads)
        return loss, grads

    return step, traces


@CASES
def test_training_moves_factors_only_and_compiles_once(case):
    model, x, _ = _adapted(case)
    teacher = nnx.clone(model)
    _randomise(teacher, seed=5, scale=0.5)
    target = _forward(teacher, x)
    model.train()
    params0 = _pure(model)
    with jax.numpy_dtype_promotion("standard"):
        optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=LoraParam)
    step, traces = _train_step()
    losses = [float(step(model, optimizer, x, target)[0]) for _ in range(10)]
    assert losses[-1] < 0.6 * losses[0]
    _assert_trees_equal(_pure(model), params0)  # the base is bit-identical
    _, grads = step(model, optimizer, x, target)
    assert all(isinstance(g, LoraParam) for g in jax.tree.leaves(grads, is_leaf=_is_var))
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(optimizer))
    ]
    moments = [p for p in paths if "['mu']" in p or "['nu']" in p]  # Adam's state per weight
    assert len(moments) == 4 * case.n_adapted
    assert all(re.search(r"\['lora_[ab]'\]\.value$", p) for p in moments)
    # other adapters of the same shapes reuse the compiled step
    for seed in (7, 8):
        _randomise(model, seed=seed)
        step(model, optimizer, x, target)
    assert len(traces) == 1


def _mlp():
    return _build(_case("mlp"))


def test_lora_param_is_not_caught_by_param_filters():
    model = _mlp()
    jlora.nnx.lora(model, LoraConfig(targets=".*kernel", rank=2), rngs=1)
    _randomise(model)
    assert not issubclass(LoraParam, nnx.Param)
    assert "lora_a" not in str(jax.tree_util.tree_structure(_pure(model)))
    factors0 = _pure(model, LoraParam)
    kernel0 = _pure(model)["layers"][0]["kernel"]
    # "train only Param": the factors are neither differentiated nor updated
    with jax.numpy_dtype_promotion("standard"):
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x = jnp.ones((4, 10))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.Param))(model)
        optimizer.update(model, grads)
        return grads

    grads = step(model, optimizer)
    assert not any(isinstance(g, LoraParam) for g in jax.tree.leaves(grads, is_leaf=_is_var))
    _assert_trees_equal(_pure(model, LoraParam), factors0)
    assert not np.array_equal(_pure(model)["layers"][0]["kernel"], kernel0)


def test_factors_equal_functional_init():
    model = _build(_case("tied"))  # an Embed (b random) and a Linear (a random)
    config = LoraConfig(targets=".*(kernel|embedding)", rank=2, alpha=4.0)
    params = _pure(model)
    jlora.nnx.lora(model, config, rngs=nnx.Rngs(params=7))
    expected = jlora.init(nnx.Rngs(params=7).params(), params, config)
    _assert_trees_equal(jlora.nnx.to_adapters(model), expected)
    assert jlora.nnx.to_adapters(model)["hidden"]["kernel"].scale == 2.0


def test_scanned_layers_get_stacked_factors():
    # (that each scan step sees its own slice is the zoo's factored == merged test for "decoder")
    model = _build(_case("decoder"))
    jlora.nnx.lora(
        model, LoraConfig(targets=r"blocks/(attn/)?(query|out|up)/kernel", rank=2), rngs=1
    )
    attn = model.blocks.attn
    assert attn.query.lora_a.shape == (2, 16, 2) and attn.query.lora_b.shape == (2, 2, 2, 8)
    assert attn.out.lora_a.shape == (2, 2, 8, 2) and attn.out.lora_b.shape == (2, 2, 16)
    adapters = jlora.nnx.to_adapters(model)
    assert adapters["blocks"]["attn"]["query"]["kernel"].layout == jlora.Layout(1, 2)
    assert adapters["blocks"]["up"]["kernel"].layout == jlora.Layout(1, 1)
    # the two layers' factors are independent draws
    a = model.blocks.up.lora_a.get_value()
    assert not np.allclose(a[0], a[1])


def test_abstract_model_and_list_paths():
    # nnx.eval_shape models work too (only shapes are read); list layers index their paths
    targets = (r"blocks/\d+/(attn/)?(query|up)/kernel", r"embed/embedding")
    model = jlora.nnx.lora(_abstract(Decoder), LoraConfig(targets, rank=2), rngs=0)
    adapters = jlora._merge.factors_by_path(jlora.nnx.to_adapters(model))
    assert sorted(adapters) == [
        "blocks/0/attn/query/kernel",
        "blocks/0/up/kernel",
        "embed/embedding",
    ]
    assert adapters["blocks/0/attn/query/kernel"].layout == jlora.Layout(1, 2)
    assert adapters["embed/embedding"].layout == jlora.Layout(1, 1, embedding=True)


def test_copy_leaves_the_model_untouched():
    model = _mlp()
    graphdef = nnx.graphdef(model)
    config = LoraConfig(targets=".*kernel", rank=2)
    adapted = jlora.nnx.lora(model, config, rngs=1, copy=True)
    assert nnx.graphdef(model) == graphdef and _pure(model, LoraParam) == {}
    assert type(adapted.layers[0]).__name__ == "LoraLinear"
    assert isinstance(adapted.layers[0], nnx.Linear)
    assert jlora.nnx.lora(model, config, rngs=1) is model
    merged = jlora.nnx.merge(model, copy=False)
    assert merged is model and type(model.layers[0]) is nnx.Linear


# --- each layer kind against a float64 reference of its LoRA term -----------------------------


def _layer(build):
    """``build(rngs)`` with NumPy weights (no per-shape XLA initialiser compiles)."""
    return materialise(build)


def _delta64(f) -> np.ndarray:
    """``scale * a @ b`` in float64, shaped like the weight (stack axes lead)."""
    a, b = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
    stack = a.shape[: a.ndim - 1 - f.layout.fan_in_ndim]
    d = np.einsum(
        "...ir,...ro->...io",
        a.reshape(*stack, -1, a.shape[-1]),
        b.reshape(*stack, b.shape[len(stack)], -1),
    )
    return f.scale * d.reshape(*stack, *a.shape[len(stack) : -1], *b.shape[len(stack) + 1 :])


def _term(layer, config, x):
    """(adapted - base output, in float64; delta in float64) for one layer with random factors.

    Shapes are chosen to repeat the zoo's, so their factor draws compile once per session."""
    base = np.asarray(_forward(layer, x))
    jlora.nnx.lora(layer, config, rngs=0)
    adapters = _randomise(layer, scale=0.5)
    (f,) = jlora._merge.factors_by_path(adapters).values()
    return np.asarray(_forward(layer, x), np.float64) - base, _delta64(f)


def _normal(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def test_linear_general_with_leading_contracted_axes():
    layer = _layer(lambda rngs: nnx.LinearGeneral((2, 8), 4, axis=(1, 2), rngs=rngs))
    x = _normal(2, 2, 8, 6)
    got, delta = _term(layer, LoraConfig(targets="kernel", rank=2), x)
    expected = np.einsum("bhdt,hdo->bto", np.asarray(x, np.float64), delta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("equation", "kernel", "x_shape"),
    [
        ("btd,dhk->bthk", (16, 2, 8), (2, 5, 16)),
        ("bthk,hkj->bthj", (2, 8, 8), (2, 5, 2, 8)),  # h is shared: one adapter per head
        ("...hj,hjd->...d", (2, 8, 4), (3, 2, 2, 8)),
    ],
)
def test_einsum_term(equation, kernel, x_shape):
    layer = _layer(lambda rngs: nnx.Einsum(equation, kernel, rngs=rngs))
    x = _normal(*x_shape)
    got, delta = _term(layer, LoraConfig(targets="kernel", rank=2), x)
    expected = np.einsum(equation, np.asarray(x, np.float64), delta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_embed_lookup_and_attend():
    layer = _layer(lambda rngs: nnx.Embed(13, 16, rngs=rngs))
    ids = jnp.asarray([[0, 3, 12], [5, 5, 1]], jnp.int32)
    q = _normal(2, 16)
    base_attend = np.asarray(layer.attend(q))
    got, delta = _term(layer, LoraConfig(targets="embedding", rank=2), ids)
    np.testing.assert_allclose(got, delta[np.asarray(ids)], rtol=1e-5, atol=1e-5)
    expected = np.asarray(q, np.float64) @ delta.T
    np.testing.assert_allclose(np.asarray(layer.attend(q)) - base_attend, expected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": (3, 3), "padding": "SAME", "strides": 2, "kernel_dilation": (2, 1)},
        {"kernel_size": (3, 3), "padding": ((2, 1), (0, 1)), "input_dilation": 2},
        {"kernel_size": (3, 3), "padding": "CIRCULAR", "kernel_dilation": (1, 2)},
        {"kernel_size": (3,), "padding": "CAUSAL", "kernel_dilation": 2},
    ],
    ids=["same-stride-dilation", "explicit-input-dilation", "circular", "causal-1d"],
)
def test_conv_equals_merged_conv(kwargs):
    layer = _layer(lambda rngs: nnx.Conv(8, 4, rngs=rngs, **kwargs))
    x = _normal(2, 7, 6, 8)[:, :, 0] if len(kwargs["kernel_size"]) == 1 else _normal(2, 7, 6, 8)
    base = _forward(layer, x)
    jlora.nnx.lora(layer, LoraConfig(targets="kernel", rank=2), rngs=0)
    _randomise(layer, scale=0.5)
    merged = jlora.nnx.merge(layer)
    y = _forward(layer, x)
    np.testing.assert_allclose(y, _forward(merged, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, base, atol=1e-2)


def test_bfloat16_layer_adds_in_its_own_dtype():
    layer = _layer(
        lambda rngs: nnx.Linear(16, 16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)
    )
    x = _normal(3, 16)
    got, delta = _term(layer, LoraConfig(targets="kernel", rank=2), x)
    assert _forward(layer, x).dtype == jnp.bfloat16
    assert layer.lora_a.get_value().dtype == jnp.float32  # float32 master factors
    np.testing.assert_allclose(got, np.asarray(x, np.float64) @ delta, rtol=0.05, atol=0.1)
    merged = jlora.nnx.merge(layer)
    assert merged.kernel.get_value().dtype == jnp.bfloat16


# --- LoRA dropout -----------------------------------------------------------------------------


def _dropout_layer(rngs):
    layer = _layer(lambda r: nnx.Linear(16, 32, rngs=r))
    base = nnx.clone(layer)
    jlora.nnx.lora(layer, LoraConfig(targets="kernel", rank=2, dropout=0.5), rngs=rngs)
    _randomise(layer)
    return layer, base


def test_dropout_in_train_mode_only():
    layer, base_layer = _dropout_layer(nnx.Rngs(params=0, dropout=1))
    x = _normal(64, 16)
    assert layer.deterministic is False  # like nnx.Dropout, adapted layers start in train mode
    base = base_layer(x)
    factors = jlora.nnx.to_adapters(layer)["kernel"]
    stream = layer.lora_rngs
    key = jax.random.fold_in(stream.key.get_value(), stream.count.get_value())
    expected = base + jlora.ops.dense_branch(x, factors, dropout_rate=0.5, rng=key)
    # Exact: eager, the layer runs these very ops (the base call, then dense_branch with this key)
    # on the same shapes.
    np.testing.assert_array_equal(layer(x), expected)
    assert not np.allclose(layer(x), expected, atol=1e-3)  # a fresh mask on each call
    no_dropout = base + jlora.ops.dense_branch(x, factors)
    layer.eval()
    np.testing.assert_array_equal(layer(x), no_dropout)
    layer.train()
    assert not np.allclose(layer(x), no_dropout, atol=1e-3)
    if hasattr(nnx, "view"):  # newer Flax: a view with LoRA dropout off
        view = nnx.view(layer, deterministic=True)
        np.testing.assert_array_equal(view(x), no_dropout)


def test_dropout_without_rng_stream():
    layer, _ = _dropout_layer(nnx.Rngs(params=0))
    with pytest.raises(
        MissingRngError,
        match=r"^\(root\): LoRA dropout is 0.5 and the layer is in train mode .* holds no",
    ):
        layer(jnp.ones((2, 16)))
    layer.eval()
    assert layer(jnp.ones((2, 16))).shape == (2, 32)


class _Stack(nnx.Module):
    """Two Linear layers stacked by nnx.vmap and run by nnx.scan."""

    def __init__(self, rngs):
        self.layers = nnx.split_rngs(splits=2)(
            nnx.vmap(lambda r: nnx.Linear(16, 16, rngs=r), in_axes=0, out_axes=0)
        )(rngs)

    def __call__(self, x):
        return nnx.scan(lambda x, layer: layer(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
            x, self.layers
        )


def test_dropout_in_scanned_layers_uses_a_stream_per_layer():
    model = _layer(_Stack)
    graphdef = nnx.graphdef(model)
    config = LoraConfig(targets=".*kernel", rank=2, dropout=0.5)
    jlora.nnx.lora(model, config, rngs=nnx.Rngs(params=0, dropout=1))
    assert model.layers.lora_rngs.key.get_value().shape == (2,)
    assert model.layers.lora_a.shape == (2, 16, 2)
    _randomise(model)
    x = _normal(4, 16)
    train = _forward(model, x)  # each layer draws its own mask from its own stream
    assert not np.array_equal(train, _forward(model, x))
    model.eval()
    no_dropout = _forward(model, x)
    merged = jlora.nnx.merge(model)
    assert nnx.graphdef(merged) == graphdef  # no stream, flag or factor left
    np.testing.assert_allclose(no_dropout, _forward(merged, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(train, no_dropout, atol=1e-4)


def test_scan_that_does_not_slice_the_factors_is_an_error():
    model = jlora.nnx.lora(_layer(_Stack), LoraConfig(targets=".*kernel", rank=2), rngs=0)
    params_only = nnx.StateAxes({nnx.Param: 0, ...: None})  # forgets LoraParam

    def forward(x, layers):
        return nnx.scan(lambda x, layer: layer(x), in_axes=(nnx.Carry, params_only))(x, layers)

    with pytest.raises(AdapterMismatchError, match=r"factors a \(2, 16, 2\) have 1 stack axes"):
        forward(jnp.ones((1, 16)), model.layers)


def test_embeddings_have_no_dropout():
    model = jlora.nnx.lora(
        _build(_case("tied")),
        LoraConfig(targets=".*(embedding|kernel)", dropout=0.5, rank=2),
        rngs=0,
    )
    assert model.embed.lora_dropout == 0.0 and not hasattr(model.embed, "deterministic")
    assert model.hidden.lora_dropout == 0.5 and model.hidden.deterministic is False


# --- bad input ----------------------------------------------------------------------------------


def _abstract(build):
    """An abstract model (shapes only): enough for errors raised before any factor is drawn."""
    return nnx.eval_shape(lambda: build(nnx.Rngs(0)))


def test_not_a_module():
    with pytest.raises(TypeError, match=r"jlora.nnx.lora: expected a flax.nnx.Module, got dict"):
        jlora.nnx.lora({"kernel": jnp.ones((2, 2))}, LoraConfig(targets="kernel"), rngs=0)
    with pytest.raises(TypeError, match=r"jlora.nnx.merge: expected a flax.nnx.Module"):
        jlora.nnx.merge([1])


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            r"blocks/0/ln1/scale",
            r"blocks/0/ln1/scale: the targets select a weight of module 'blocks/0/ln1' of kind "
            r"LayerNorm; jlora.nnx adapts the weights of nnx.Linear, nnx.LinearGeneral, "
            r"nnx.Einsum, nnx.Conv, nnx.Embed",
        ),
        (
            r"blocks/0/up/.*",
            r"blocks/0/up/bias: the targets select the 'bias' of nnx.Linear 'blocks/0/up' \(only "
            r"its 'kernel' can be adapted\)",
        ),
        (r"blocks/.*/qurey/kernel", r"target 'blocks/.\*/qurey/kernel' matches no parameter path"),
    ],
)
def test_targets_that_cannot_be_adapted(targets, message):
    with pytest.raises(TargetError, match=message):
        jlora.nnx.lora(_abstract(Decoder), LoraConfig(targets=targets, rank=2), rngs=0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda r: nnx.ConvTranspose(2, 3, (3,), rngs=r),
            r"^kernel: the targets select a weight of module '\(root\)' of kind ConvTranspose; "
            r"jlora.nnx adapts",
        ),
        (lambda r: nnx.LinearGeneral(4, 3, batch_axis={0: 2}, rngs=r), r"batch_axis=\{0: 2\}"),
        (lambda r: nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=r), "feature_group_count=2"),
        (lambda r: nnx.Conv(2, 2, (3,), mask=jnp.ones((3, 2, 2)), rngs=r), "with a kernel mask"),
        (
            lambda r: nnx.Einsum("nta,ab->nt", (4, 5), rngs=r),
            r"^\(root\): nnx.Einsum cannot be adapted: einsum 'nta,ab->nt': kernel letter\(s\) "
            r"\['b'\] are summed away",
        ),
    ],
    ids=["conv-transpose", "batch-axis", "groups", "mask", "einsum-summed"],
)
def test_unsupported_layer_configurations(build, message):
    with pytest.raises(TargetError, match=message):
        jlora.nnx.lora(_abstract(build), LoraConfig(targets=".*kernel", rank=1), rngs=0)


def test_adapting_twice_is_an_error():
    model = jlora.nnx.lora(_mlp(), LoraConfig(targets=".*kernel", rank=2), rngs=0)
    with pytest.raises(TargetError, match=r"layers/0/kernel: this layer already has LoRA factors"):
        jlora.nnx.lora(model, LoraConfig(targets=".*0/kernel"), rngs=0)


def test_rngs_without_params_stream():
    with pytest.raises(MissingRngError, match=r"rngs has no 'params' \(or 'default'\) stream"):
        jlora.nnx.lora(_abstract(MLP), LoraConfig(targets=".*kernel"), rngs=nnx.Rngs(dropout=0))


def test_adapters_that_do_not_match_the_model():
    model = jlora.nnx.lora(_mlp(), LoraConfig(targets=".*kernel", rank=2), rngs=0)
    other = jlora.nnx.lora(_mlp(), LoraConfig(targets=".*[01]/kernel", rank=2), rngs=0)
    with pytest.raises(
        AdapterMismatchError, match=r"layers/2/kernel: the model has an adapted layer here but"
    ):
        jlora.nnx.set_adapters(model, jlora.nnx.to_adapters(other))
    with pytest.raises(AdapterMismatchError, match=r"layers/2/kernel: the adapters have factors"):
        jlora.nnx.set_adapters(other, jlora.nnx.to_adapters(model))
    adapters = jlora.nnx.to_adapters(model)
    f = adapters["layers"]["1"]["kernel"]
    adapters["layers"]["1"]["kernel"] = jlora.LoraFactors(f.a[:5], f.b, f.scale, f.layout)
    with pytest.raises(
        AdapterMismatchError,
        match=r"layers/1/kernel: adapter factors a \(5, 2\), b \(2, 32\) do not fit the weight "
        r"of shape \(32, 32\)",
    ):
        jlora.nnx.set_adapters(model, adapters)
    adapters["layers"]["1"]["kernel"] = jlora.LoraFactors(f.a, f.b, f.scale, jlora.Layout(2, 1))
    with pytest.raises(AdapterMismatchError, match=r"layers/1/kernel: adapter layout .* differs"):
        jlora.nnx.set_adapters(model, adapters)
    half = nnx.state(model, LoraParam)
    del half["layers"][0]["lora_b"]
    with pytest.raises(AdapterMismatchError, match=r"layers/0: the state holds \['lora_a'\]"):
        jlora.nnx.to_adapters(half)


def test_set_adapters_may_change_rank_and_scale():
    model = jlora.nnx.lora(_mlp(), LoraConfig(targets=".*kernel", rank=2), rngs=0)
    params = _pure(model)
    rng = np.random.default_rng(4)
    adapters = {
        "layers": {
            str(i): {
                "kernel": jlora.LoraFactors(
                    rng.normal(size=(n, 3)), rng.normal(size=(3, m)), 0.5, jlora.Layout(1, 1)
                )
            }
            for i, (n, m) in enumerate([(10, 32), (32, 32), (32, 3)])
        }
    }
    jlora.nnx.set_adapters(model, adapters)
    assert model.layers[0].lora_a.shape == (10, 3)
    assert model.layers[0].lora_a.get_metadata()["lora_scale"] == 0.5
    merged = jlora.nnx.merge(model)
    _assert_trees_equal(_pure(merged), jlora.merge(params, adapters))


def test_to_state_fills_an_abstract_model():
    # Restoring a checkpoint into the model nnx.eval_shape makes: no factor is drawn first.
    config = LoraConfig(targets=".*kernel", rank=2)
    model = jlora.nnx.lora(_mlp(), config, rngs=0)
    abstract = nnx.eval_shape(lambda: jlora.nnx.lora(_mlp(), config, rngs=1))
    assert isinstance(abstract.layers[0].lora_a.get_value(), jax.ShapeDtypeStruct)
    state = jlora.nnx.to_state(abstract, jlora.nnx.to_adapters(model))
    assert jax.tree.structure(state) == jax.tree.structure(nnx.state(model, LoraParam))
    _assert_trees_equal(nnx.to_pure_dict(state), _pure(model, LoraParam))
