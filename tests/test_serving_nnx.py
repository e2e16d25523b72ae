"""jlora.serving.nnx_apply: mixed-adapter batches for unmodified flax.nnx models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_nnx import VOCAB, Decoder, EinsumNet, ScannedDecoder, materialise

import jlora
import jlora.nnx
from jlora.serving import BASE, AdapterBank, BankError, nnx_apply


def _randomize(adapters, seed, size=0.2):
    """Nonzero factors (init has b = 0, which would make every adapter the base)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(size * rng.normal(size=x.shape), x.dtype), adapters)


def _adapted(model, configs):
    """``{name: (model adapted alone by jlora.nnx, its adapters, config)}`` with random factors."""
    out = {}
    for i, (name, config) in enumerate(configs.items()):
        adapted = jlora.nnx.lora(model, config, rngs=i, copy=True)
        adapters = _randomize(jlora.nnx.to_adapters(adapted), seed=30 + i)
        jlora.nnx.set_adapters(adapted, adapters)
        out[name] = (adapted, adapters, config)
    return out


DECODER_CONFIGS = {
    "all": jlora.LoraConfig(targets=r".*(query|value|out|up|down)/kernel|embed/embedding", rank=3),
    "attn": jlora.LoraConfig(targets=r".*attn/(query|key)/kernel", rank=2, alpha=1.0),
    "mlp": jlora.LoraConfig(targets=r".*(up|down)/kernel|embed/embedding", rank=4, alpha=8.0),
}
NAMES = ["all", None, "mlp", "attn", "all", None]


def _forward(model, factors, ids, x):
    return nnx_apply(model, factors, ids, x)


call = nnx.jit(lambda model, x: model(x))  # one program per reference, not one per eager op
call_merged = nnx.jit(lambda model, x: jlora.nnx.merge(model)(x))  # the merge compiled too


@pytest.fixture(scope="module")
def decoder():
    model = materialise(lambda rngs: Decoder(rngs, layers=1))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, size=(6, 5)), jnp.int32)
    adapted = _adapted(model, DECODER_CONFIGS)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    bank = AdapterBank.build(params, {n: (a, c) for n, (_, a, c) in adapted.items()}, capacity=4)
    return model, tokens, adapted, bank


@pytest.mark.parametrize("strategy", ["gather", "onehot"])
def test_decoder_mixed_batch_equals_each_adapter_alone_and_merged(decoder, strategy):
    # Embed lookup and attend (tied head), LinearGeneral attention, Linear MLP.
    model, tokens, adapted, bank = decoder
    run = nnx.jit(lambda m, f, ids, t: nnx_apply(m, f, ids, t, strategy=strategy))
    mixed = run(model, bank.factors, bank.ids(NAMES), tokens)
    base = call(model, tokens)
    scale = float(jnp.abs(base).max())
    for name in set(NAMES):
        rows = np.array([e for e, n in enumerate(NAMES) if n == name])
        if name is None:  # an exact zero term, in another program than the eager base
            np.testing.assert_allclose(mixed[rows], base[rows], rtol=0, atol=1e-6 * scale)
            continue
        alone = call(adapted[name][0], tokens)
        merged = call_merged(adapted[name][0], tokens)
        assert float(jnp.abs(alone - base)[rows].max()) > 1e-2 * scale  # the adapter matters
        for want in (alone, merged):
            np.testing.assert_allclose(mixed[rows], want[rows], rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{name} {strategy}")  # fmt: skip
    assert type(model.embed) is nnx.Embed  # classes switched back: the model is unchanged
    assert nnx.graphdef(model) == nnx.graphdef(materialise(lambda rngs: Decoder(rngs, layers=1)))


def test_hot_swap_and_new_ids_reuse_the_compiled_program(decoder):
    model, tokens, adapted, bank = decoder
    traces = []

    @nnx.jit
    def run(m, f, ids, t):
        traces.append(1)
        return nnx_apply(m, f, ids, t)

    first = run(model, bank.factors, bank.ids(["all"] * 6), tokens)
    swapped = bank.put(3, adapted["attn"][1], name="attn2").remove(0)
    ids = swapped.ids(["attn2", "mlp", None, "attn", "mlp", "attn2"])
    second = run(model, swapped.factors, ids, tokens)
    assert len(traces) == 1
    assert not np.array_equal(first, second)


def test_einsum_layers_with_shared_letters_and_ellipsis():
    model = materialise(EinsumNet)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5, 16)), jnp.float32)
    configs = {"e": jlora.LoraConfig(targets=".*kernel", rank=2)}
    (adapted, adapters, _), = _adapted(model, configs).values()  # fmt: skip
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    bank = AdapterBank.build(params, {"e": adapters}, capacity=2)
    assert bank.factors["per_head"]["kernel"].a.shape == (2, 2, 8, 2)  # one adapter per head
    mixed = nnx.jit(_forward)(model, bank.factors, bank.ids(["e", None, "e"]), x)
    alone, base = call(adapted, x), call(model, x)
    assert float(jnp.abs(alone - base).max()) > 1e-2
    np.testing.assert_allclose(mixed[::2], alone[::2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed[1], base[1], rtol=0, atol=1e-6)


def test_errors(decoder):
    model, tokens, adapted, bank = decoder
    with pytest.raises(BankError, match="example 2: adapter id 3 names an empty slot"):
        nnx_apply(model, bank, jnp.array([0, 0, 3, 0, 0, 0]), tokens)
    with pytest.raises(BankError, match="example 0 has adapter id 7; expected -1"):
        nnx_apply(model, bank, jnp.array([7, 0, 0, 0, 0, 0]), tokens)
    with pytest.raises(jlora.AdapterMismatchError, match=r"already has jlora\.nnx LoRA factors"):
        nnx_apply(adapted["all"][0], bank.factors, jnp.zeros((6,), jnp.int32), tokens)
    two = materialise(lambda rngs: Decoder(rngs, layers=2))
    wrong = {"blocks": {"1": {"up": {"kernel": bank.factors["blocks"]["0"]["up"]["kernel"]}}}}
    wrong["blocks"]["1"]["up"]["kernel"] = jax.tree.map(
        lambda x: x[:, :-1] if x.ndim == 3 else x, wrong["blocks"]["1"]["up"]["kernel"]
    )
    with pytest.raises(jlora.AdapterMismatchError, match=r"blocks/1/up/kernel: bank factors a"):
        nnx_apply(two, wrong, jnp.zeros((6,), jnp.int32), tokens)
    with pytest.raises(jlora.AdapterMismatchError, match="blocks/0/ln1/scale: a weight of a"):
        nnx_apply(model, {"blocks": {"0": {"ln1": {"scale": bank.factors["embed"]["embedding"]}}}},
                  jnp.zeros((6,), jnp.int32), tokens)  # fmt: skip
    with pytest.raises(jlora.AdapterMismatchError, match=r"no such nnx\.Param"):
        nnx_apply(model, {"nope": {"kernel": bank.factors["embed"]["embedding"]}},
                  jnp.zeros((6,), jnp.int32), tokens)  # fmt: skip
    assert type(model.embed) is nnx.Embed  # restored after every error


def test_stacked_layers_are_refused_by_name():
    model = materialise(ScannedDecoder)
    config = jlora.LoraConfig(targets=r"blocks/up/kernel", rank=2)
    adapters = jlora.nnx.to_adapters(jlora.nnx.lora(model, config, rngs=0, copy=True))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    bank = AdapterBank.build(params, {"s": adapters})
    tokens = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(jlora.AdapterMismatchError, match=r"blocks/up/kernel: a stacked weight"):
        nnx_apply(model, bank, jnp.array([0, BASE]), tokens)


class Scaled(nnx.Embed):
    """Gemma's pattern: a subclass whose own methods call the parent's."""

    def __call__(self, tokens):
        return super().__call__(tokens) * 2.0

    def decode(self, x):
        return self.attend(x)


class Replaced(nnx.Linear):
    def __call__(self, x):  # never reaches nnx.Linear.__call__
        return x @ self.kernel[...]


def test_subclasses_get_the_term_inside_the_parent_method():
    model = Scaled(7, 4, rngs=nnx.Rngs(0))
    config = jlora.LoraConfig(targets="embedding", rank=2)
    ((adapted, adapters, _),) = _adapted(model, {"e": config}).values()
    bank = AdapterBank.build(nnx.to_pure_dict(nnx.state(model, nnx.Param)), {"e": adapters})
    tokens, x = jnp.array([[1, 2], [3, 4]]), jnp.ones((2, 4), jnp.float32)
    ids = bank.ids(["e", None])
    looked = nnx_apply(model, bank, ids, tokens)
    decoded = nnx_apply(model, bank, ids, x, method="decode")
    np.testing.assert_allclose(looked[0], adapted(tokens)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(looked[1], model(tokens)[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(decoded[0], adapted.decode(x)[0], rtol=0, atol=1e-6)
    assert type(model) is Scaled
    linear = Replaced(3, 2, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(linear, nnx.Param))
    one = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="kernel", rank=1))
    with pytest.raises(jlora.AdapterMismatchError, match=r"kernel: .*Replaced\.__call__ overrides"):
        nnx_apply(linear, AdapterBank.build(params, {"one": one}), jnp.array([0]), jnp.ones((1, 3)))
