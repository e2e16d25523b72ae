"""jlora.serving: factors gathered once per sequence, and training many adapters in one batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models_linen import Decoder, random_variables
from models_nnx import VOCAB, materialise
from models_nnx import Decoder as NnxDecoder
from numerics import EPS32, f64

import jlora
import jlora.linen
from jlora.serving import (
    STRATEGIES,
    AdapterBank,
    BankError,
    BankFactors,
    apply,
    dense_term,
    freeze_scales,
    gather,
    nnx_apply,
)

CONFIGS = {
    "all": jlora.LoraConfig(targets=".*(kernel|embedding)", rank=3, alpha=6.0),
    "attn": jlora.LoraConfig(targets=".*(query|value)/kernel", rank=2, alpha=1.0),
    "mlp": jlora.LoraConfig(targets=".*(up|down)/kernel|.*embedding", rank=4, alpha=4.0),
}
# "attn" (slot 1) and the empty slot 3 are absent; base rows are clipped to slot 0 ("all").
NAMES = ["all", None, "mlp", "all", "mlp", None, "mlp"]


def _randomize(adapters, seed, size=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(size * rng.normal(size=x.shape), x.dtype), adapters)


@pytest.fixture(scope="module")
def decoder():
    """A Linen decoder (scanned, rematerialised blocks, tied embedding), a bank of 3 of 4 slots."""
    model = Decoder(layers=2)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 13, size=(len(NAMES), 5)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 13, size=tokens.shape), jnp.int32)
    params = jax.tree.map(jnp.asarray, random_variables(model, tokens)["params"])  # no program
    adapters = {}
    for i, (name, config) in enumerate(CONFIGS.items()):  # shapes only: the values are random
        init = jlora.linen.lora(model, config).init_adapters
        adapters[name] = _randomize(jax.eval_shape(init, jax.random.key(i), params, tokens), 20 + i)
    bank = AdapterBank.build(params, {k: (v, CONFIGS[k]) for k, v in adapters.items()}, capacity=4)
    return model, params, tokens, labels, adapters, bank


def _xent_sum(logits, labels):
    """A sum over examples (not a mean): each example's gradient counts once, in any batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()


def test_gathered_factors_give_the_same_outputs(decoder):
    model, params, tokens, _, _, bank = decoder
    ids = bank.ids(NAMES)
    want = jax.jit(lambda p, f, i, t: apply(model, p, f, i, t))(params, bank.factors, ids, tokens)
    rows = jax.jit(gather)(bank.factors, ids)
    assert rows["embed"]["embedding"].a.shape[0] == len(NAMES)
    got = jax.jit(lambda p, f, t: apply(model, p, f, None, t))(params, rows, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


def test_gathered_factors_in_nnx():
    model = materialise(lambda rngs: NnxDecoder(rngs, layers=1))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, size=(4, 5)), jnp.int32)
    config = jlora.LoraConfig(targets=r".*(query|up)/kernel|embed/embedding", rank=2)
    adapted = jlora.nnx.lora(model, config, rngs=0, copy=True)
    adapters = _randomize(jlora.nnx.to_adapters(adapted), seed=5)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    bank = AdapterBank.build(params, {"one": (adapters, config)}, capacity=2)
    ids = bank.ids(["one", None, "one", None])
    run = nnx.jit(lambda m, f, i, x: nnx_apply(m, f, i, x))
    want = run(model, bank.factors, ids, tokens)
    got = run(model, gather(bank.factors, ids), None, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


def test_gather_errors(decoder):
    model, params, tokens, _, _, bank = decoder
    with pytest.raises(BankError, match="example 1 has adapter id 4"):
        gather(bank.factors, jnp.array([0, 4]))
    with pytest.raises(BankError, match="not an AdapterBank's factors"):
        gather({"w": jnp.ones(3)}, jnp.array([0]))
    with pytest.raises(BankError, match="ids=None is for factors gathered per example"):
        apply(model, params, bank, None, tokens)
    f = BankFactors(jnp.ones((2, 3, 1)), jnp.ones((2, 1, 4)), jnp.ones(2), jlora.Layout(1, 1))
    with pytest.raises(BankError, match="they hold 2 rows for a batch of 3"):
        dense_term(jnp.ones((3, 3)), None, f)


def _padded_entries(bank, factors):
    """Every value beyond a slot's true rank (padded columns of a, rows of b), flattened."""
    out = []
    for path, bf in bank.table.items():
        node = factors
        for key in path.split("/"):
            node = node[key]
        n_stack = node.a.ndim - 2 - bf.layout.fan_in_ndim
        for slot, ranks in enumerate(bank.ranks):
            r = 0 if ranks is None else ranks.get(path, 0)
            a, b = np.asarray(node.a)[slot], np.asarray(node.b)[slot]  # NumPy: no eager programs
            out.append(a[..., r:].ravel())
            out.append(np.moveaxis(b, n_stack, 0)[r:].ravel())
    return np.concatenate(out)


@pytest.mark.parametrize(
    "strategy",
    [s if s == "gather" else pytest.param(s, marks=pytest.mark.slow) for s in STRATEGIES],
)
def test_one_mixed_step_is_each_adapters_own_step(decoder, strategy):
    model, params, tokens, labels, adapters, bank = decoder
    ids = bank.ids(NAMES)
    lr = 0.1
    tx = freeze_scales(optax.sgd(lr))

    @jax.jit
    def step(factors, opt_state):
        def loss(f):
            return _xent_sum(apply(model, params, f, ids, tokens, strategy=strategy), labels)

        grads = jax.grad(loss)(factors)
        updates, opt_state = tx.update(grads, opt_state, factors)
        return optax.apply_updates(factors, updates), opt_state

    new, _ = step(bank.factors, tx.init(bank.factors))
    trained = bank.with_factors(new)  # checks the scales and the padded entries
    assert not _padded_entries(bank, new).any()
    for name in ("all", "mlp"):  # each present adapter: its own sub-batch alone
        rows = np.array([e for e, n in enumerate(NAMES) if n == name])
        lora = jlora.linen.lora(model, CONFIGS[name])
        grad = jax.jit(
            jax.grad(lambda a, rows=rows, lora=lora: _xent_sum(
                lora.apply(params, a, tokens[rows]), labels[rows]))
        )(adapters[name])  # fmt: skip
        want = jax.tree.map(lambda a, g: f64(a) - lr * f64(g), adapters[name], grad)
        got = trained.adapter(bank.slot_of(name))
        for g, w, a, d in zip(
            *(jax.tree.leaves(t) for t in (got, want, adapters[name], grad)), strict=True
        ):
            bound = 1e-5 * lr * float(np.abs(f64(d)).max()) + 2 * EPS32 * np.abs(f64(a))
            assert np.all(np.abs(f64(g) - w) <= bound), name
            assert np.abs(f64(g) - f64(a)).max() > 0  # it did move
    for old, got in zip(jax.tree.leaves(bank.factors), jax.tree.leaves(new), strict=True):
        for slot in (bank.slot_of("attn"), 3):  # absent from the batch: bit for bit
            assert np.asarray(got)[slot].tobytes() == np.asarray(old)[slot].tobytes()
    for path, bf in bank.table.items():  # scales: bit for bit
        node = new
        for key in path.split("/"):
            node = node[key]
        assert np.asarray(node.scale).tobytes() == np.asarray(bf.scale).tobytes()


@pytest.mark.slow
def test_padded_ranks_stay_zero_over_adamw_steps(decoder):
    model, params, tokens, labels, _, bank = decoder
    tx = freeze_scales(optax.adamw(1e-2, weight_decay=0.1))
    rng = np.random.default_rng(7)

    @jax.jit
    def step(factors, opt_state, ids):
        def loss(f):
            return _xent_sum(apply(model, params, f, ids, tokens), labels)

        grads = jax.grad(loss)(factors)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
            updates, opt_state = tx.update(grads, opt_state, factors)
        return optax.apply_updates(factors, updates), opt_state

    factors, opt_state = bank.factors, tx.init(bank.factors)
    for _ in range(4):  # slot 1 ("attn") and slot 3 never appear
        ids = jnp.asarray(rng.choice([-1, 0, 2], size=len(NAMES)), jnp.int32)
        factors, opt_state = step(factors, opt_state, ids)
    assert step._cache_size() == 1
    assert not _padded_entries(bank, factors).any()
    trained = bank.with_factors(factors)
    is_bank = lambda x: isinstance(x, BankFactors)  # noqa: E731
    old_nodes = jax.tree.leaves(bank.factors, is_leaf=is_bank)
    for old, got in zip(old_nodes, jax.tree.leaves(factors, is_leaf=is_bank), strict=True):
        assert np.asarray(got.scale).tobytes() == np.asarray(old.scale).tobytes()
        for x, y in ((old.a, got.a), (old.b, got.b)):
            # Slot 1 never had a gradient, so Adam's direction is 0, but weight decay shrinks it.
            want = f64(x[1]) * (1 - 1e-2 * 0.1) ** 4
            np.testing.assert_allclose(f64(y[1]), want, rtol=8 * EPS32, atol=0)
    assert trained.adapter(0)["embed"]["embedding"].rank == 3


def test_with_factors_refuses_what_is_not_the_bank(decoder):
    *_, bank = decoder
    factors = bank.factors
    emb = factors["embed"]["embedding"]

    def replaced(**changes):
        out = jax.tree.map(lambda x: x, factors, is_leaf=lambda x: isinstance(x, BankFactors))
        out["embed"] = {"embedding": dataclasses.replace(emb, **changes)}
        return out

    with pytest.raises(BankError, match="embed/embedding: the scales changed"):
        bank.with_factors(replaced(scale=emb.scale + 1.0))
    slot = bank.slot_of("attn")  # "attn" does not adapt the embedding: its factors there are 0
    with pytest.raises(BankError, match=r"embed/embedding: slot 1 \('attn', rank 0\) has nonzero"):
        bank.with_factors(replaced(a=emb.a.at[slot, 0, 0].set(1.0)))
    with pytest.raises(BankError, match=r"slot 0 \('all', rank 3\) has nonzero"):
        bank.with_factors(replaced(b=emb.b.at[0, 3, 0].set(1.0)))
    with pytest.raises(BankError, match="embed/embedding: factor a has shape"):
        bank.with_factors(replaced(a=emb.a[:, :, :2]))
    with pytest.raises(BankError, match="factors have paths"):
        bank.with_factors({"embed": factors["embed"]})
