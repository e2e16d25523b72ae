"""jlora.nnx on Gemma's model code (examples/gemma_nnx.py): fast invariants and the whole run (slow).

The model is written as Gemma writes it (an ``nnx.Embed`` subclass that scales its lookup and
decodes with ``attend``, ``nnx.Einsum`` kernels in Gemma's axis orders, a KV cache), not shaped
for LoRA. Whole-model outputs of different programs (factored vs merged) have no float64 twin and
are compared within 1e-5 of the output's scale (docs/design.md, "Numerics policy"). Where Google
DeepMind's ``gemma`` package is installed (4.x needs Python 3.12+), a slow test checks the example's
model against the package's own Transformer, on the base weights and on jlora-merged ones.
"""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
import jlora.nnx

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import gemma_nnx as gm  # noqa: E402

# Tiny, and every kernel shape distinct from every activation shape (B, T below), so the jaxpr
# check cannot mistake one for the other.
CONFIG = gm.GemmaConfig(
    vocab_size=32,
    num_layers=2,
    embed_dim=16,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    hidden_dim=24,
)
TASK = gm.Task(length=3, symbols=8)
B = 3  # sequences of T = 2 * 3 + 2 = 8 tokens, 7 fed to the model
KERNELS = {  # the einsum kernels, as Gemma shapes them
    "q_einsum": (4, 16, 4),
    "kv_einsum": (2, 2, 16, 4),
    "attn_vec_einsum": (4, 4, 16),
    "gating_einsum": (2, 24, 16),
    "linear": (24, 16),
}


@functools.cache
def _base() -> gm.Gemma:
    """Built once (its initialisers run op by op, eagerly); each test adapts a clone."""
    model = gm.Gemma(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "scale":  # RMSNorm scales start at 0; make them matter
            var.set_value(jnp.asarray(0.3 * rng.normal(size=var.shape), jnp.float32))
    return model


def _model() -> gm.Gemma:
    return nnx.clone(_base())


def _tokens(seed: int) -> jax.Array:
    return TASK.batch(jax.random.key(seed), B, reverse=True)


def _adapt(model: gm.Gemma, seed: int, *, randomise: bool) -> gm.Gemma:
    jlora.nnx.lora(model, gm.lora_config(rank=2), rngs=nnx.Rngs(params=seed))
    if randomise:  # b = 0 at init; give every factor a value so every product matters
        rng = np.random.default_rng(seed)
        adapters = jax.tree.map(
            lambda v: jnp.asarray(0.3 * rng.normal(size=v.shape), v.dtype),
            jlora.nnx.to_adapters(model),
        )
        jlora.nnx.set_adapters(model, adapters)
    return model


def test_every_gemma_layer_is_adapted_with_its_own_layout():
    model = _adapt(_model(), 1, randomise=False)
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    layers = [attn.q_einsum, attn.kv_einsum, attn.attn_vec_einsum, mlp.gating_einsum, mlp.linear]
    layouts = {
        name: layer.lora_a.get_metadata()["lora_layout"].roles(len(shape))
        for layer, (name, shape) in zip(layers, KERNELS.items(), strict=True)
    }
    assert layouts == {
        "q_einsum": "oio",
        "kv_einsum": "ooio",
        "attn_vec_einsum": "iio",
        "gating_einsum": "ooi",
        "linear": "io",
    }
    assert type(model.embedder).__name__ == "LoraEmbedder" and isinstance(
        model.embedder, gm.Embedder
    )
    assert model.embedder.lora_a.shape == (32, 2) and model.embedder.lora_b.shape == (2, 16)


def test_init_equals_the_base_bit_for_bit_eagerly():
    model, tokens = _model(), _tokens(3)
    base, _ = model(tokens[:, :-1])
    _adapt(model, 4, randomise=False)
    # Eager: each op is the same primitive on the same shapes, plus an exact zero per layer.
    np.testing.assert_array_equal(model(tokens[:, :-1])[0], base)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)[0]


def test_adapted_logits_equal_the_merged_plain_model():
    base = _model()
    graphdef = nnx.graphdef(base)
    model, tokens = _adapt(nnx.clone(base), 6, randomise=True), _tokens(7)[:, :-1]
    merged = jlora.nnx.merge(model)
    assert nnx.graphdef(merged) == graphdef  # the base's classes, no LoRA attribute left
    assert type(merged.embedder) is gm.Embedder
    assert type(merged.layers[1].attn.kv_einsum) is nnx.Einsum
    got, want = _logits(model, tokens), _logits(merged, tokens)
    base_logits = _logits(base, tokens)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    # The adapters change the logits by far more than that bound.
    assert float(jnp.max(jnp.abs(want - base_logits))) > 1e-2 * scale


def test_gradients_reach_only_the_lora_factors():
    model, tokens = _adapt(_model(), 9, randomise=True), _tokens(10)
    base = nnx.clone(nnx.state(model, nnx.Param))
    factors = nnx.clone(nnx.state(model, jlora.nnx.LoraParam))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam under the strict test config
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jlora.nnx.LoraParam)
        gm.train_step(model, optimizer, tokens, TASK)
    # a and b of the embedder and of 5 einsums a layer; Adam holds two moments of each, no more.
    shapes = [x.shape for x in jax.tree.leaves(factors)]
    assert len(shapes) == 2 * (1 + 5 * CONFIG.num_layers)
    moments = [x.shape for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if x.ndim]
    assert sorted(moments) == sorted(2 * shapes)
    for before, after in zip(
        jax.tree.leaves(base), jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(after, before)
    for before, after in zip(
        jax.tree.leaves(factors),
        jax.tree.leaves(nnx.state(model, jlora.nnx.LoraParam)),
        strict=True,
    ):
        assert not np.array_equal(after, before)  # every factor got a gradient


def _weight_shaped(jaxpr, shapes) -> list:
    """Equations whose output has the shape of a kernel in any axis order (a formed delta
    ``a @ b``, a merged weight), in ``jaxpr`` and its sub-jaxprs. A call's own outputs are its
    body's, checked there: ``nnx.jit`` returns the model's kernels, unchanged, from its call."""
    wanted = [sorted(s) for s in shapes]
    found = []
    for eqn in jaxpr.eqns:
        subs = [
            getattr(sub, "jaxpr", sub)
            for value in eqn.params.values()
            for sub in (value if isinstance(value, (tuple, list)) else (value,))
        ]
        subs = [sub for sub in subs if hasattr(sub, "eqns")]
        for sub in subs:
            found += _weight_shaped(sub, shapes)
        if not subs:
            found += [
                (eqn.primitive.name, var.aval.shape)
                for var in eqn.outvars
                if sorted(getattr(var.aval, "shape", ())) in wanted
            ]
    return found


def test_the_train_step_never_forms_a_kernel_sized_product():
    model, tokens = _adapt(_model(), 12, randomise=True), _tokens(13)
    with jax.numpy_dtype_promotion("standard"):
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jlora.nnx.LoraParam)
        graphdef, state = nnx.split((model, optimizer))

        def step(state, tokens):
            model, optimizer = nnx.merge(graphdef, state)
            return gm.train_step(model, optimizer, tokens, TASK)

        jaxpr = jax.make_jaxpr(step)(state, tokens).jaxpr
    assert _weight_shaped(jaxpr, list(KERNELS.values())) == []
    # The check sees such a product when there is one: the merge forms each kernel.
    merge_jaxpr = jax.make_jaxpr(lambda s: jlora.merge(*s))(
        (nnx.to_pure_dict(nnx.state(model, nnx.Param)), jlora.nnx.to_adapters(model))
    ).jaxpr
    found = {tuple(sorted(s)) for _, s in _weight_shaped(merge_jaxpr, list(KERNELS.values()))}
    assert found == {tuple(sorted(s)) for s in KERNELS.values()}


@pytest.mark.slow  # ~4 s; the whole run (slow) checks cached decoding of the trained model too
def test_cached_greedy_decoding_of_the_adapted_model_equals_the_merged_model():
    model, tokens = _adapt(_model(), 15, randomise=True), _tokens(16)
    prompt = TASK.prompt(tokens)
    adapted = gm.generate(model, prompt, 4)  # the adapters run inside the jitted decode step
    assert adapted.shape == (B, 4)
    np.testing.assert_array_equal(adapted, gm.generate(jlora.nnx.merge(model), prompt, 4))
    # (The slow test also checks cached against uncached decoding, on the trained model.)


@pytest.mark.slow
def test_gemma_example_end_to_end(capsys):
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam under the strict test config
        result = gm.main([])
    out = capsys.readouterr().out
    assert "trainable params: 3,968 of 20,800" in out
    assert result["copy_accuracy"] > 0.95 and result["before"] < 0.2
    assert result["after"] > 0.9 and result["exact"] > 0.7
    assert result["same_at_init"] and result["untouched"] and result["plain"]
    assert result["error"] < 1e-5 and result["same_tokens"]
    assert result["package_error"] is None or result["package_error"] < 1e-5


def _by_gemma_paths(adapters: dict) -> dict:
    """Adapters keyed by our model's paths, re-keyed by the gemma package's parameter paths."""
    theirs_of = {ours: theirs for theirs, ours in gm.gemma_package_paths(CONFIG).items()}
    flat, _ = jax.tree_util.tree_flatten_with_path(
        adapters, is_leaf=lambda x: isinstance(x, jlora.LoraFactors)
    )
    out: dict = {}
    for path, factors in flat:
        *parents, leaf = theirs_of["/".join(str(k.key) for k in path)].split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = factors
    return out


@pytest.mark.slow
def test_the_gemma_package_agrees_on_the_base_and_merged_weights_and_gradients():
    pytest.importorskip("gemma")  # Google DeepMind's gemma 4.x (Python 3.12+): Linen only
    model, tokens = _model(), _tokens(17)
    inputs = tokens[:, :-1]
    params = gm.to_gemma_package_params(model)
    want = gm.gemma_package_logits(CONFIG, params, inputs)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(_logits(model, inputs), want, rtol=0, atol=1e-5 * scale)

    # jlora.nnx's factored terms on our code against jlora.merge into Google's parameter tree (the
    # factors keep the layouts jlora.nnx inferred from each einsum equation). jlora.linen cannot
    # adapt the package's model itself: its Einsum takes the equation as its first argument.
    _adapt(model, 18, randomise=True)
    adapters = _by_gemma_paths(jlora.nnx.to_adapters(model))
    assert set(adapters["layer_0"]["mlp"]) == {"gating_einsum", "linear"}
    theirs = gm.gemma_package_logits(CONFIG, jlora.merge(params, adapters), inputs)
    scale = float(jnp.max(jnp.abs(theirs)))
    np.testing.assert_allclose(_logits(model, inputs), theirs, rtol=0, atol=1e-5 * scale)

    def their_loss(adapters):
        logits = gm.gemma_package_logits(CONFIG, jlora.merge(params, adapters), inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def our_loss(model):
        logits, _ = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    want = jax.jit(jax.grad(their_loss))(adapters)
    grads = nnx.jit(nnx.grad(our_loss, argnums=nnx.DiffState(0, jlora.nnx.LoraParam)))(model)
    got = _by_gemma_paths(jlora.nnx.to_adapters(grads))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        bound = 1e-5 * float(jnp.max(jnp.abs(w)))  # whole-model policy, per gradient leaf
        np.testing.assert_allclose(g, w, rtol=0, atol=bound, err_msg=jax.tree_util.keystr(path))
