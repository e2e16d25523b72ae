"""Layers jlora does not know (`jlora.CustomLayer`) and subclasses that override a layer's method.

The custom layer is GPT-2's ``Conv1D`` as Hugging Face writes it in Flax: a Dense whose kernel is
stored ``(out, in)``. The subclass is Gemma's embedder: an ``Embed`` whose ``__call__`` scales the
looked-up rows by ``sqrt(features)``, calling ``super().__call__``. Every adapted output is compared
with a float64 NumPy forward of the merged weights.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_nnx import materialise

import jlora
import jlora.linen
import jlora.nnx
from jlora import AdapterMismatchError, ConfigError, CustomLayer, LoraConfig, TargetError

IN, OUT, VOCAB, FEATURES = 6, 5, 11, 4
EPS = np.finfo(np.float32).eps


class LinenConv1D(nn.Module):
    """A Dense layer whose kernel is stored transposed, ``(out, in)``."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))
        return y + jnp.broadcast_to(bias, y.shape)


class LinenScaledEmbed(nn.Embed):
    def __call__(self, ids):
        return super().__call__(ids) * jnp.sqrt(float(self.features))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = LinenScaledEmbed(VOCAB, IN, name="embed")(ids)
        return LinenConv1D(OUT, name="proj")(h)


CONV1D = {LinenConv1D: CustomLayer(param="kernel", layout="oi")}


def _ids(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(2, 3))


def _linen_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "embed": {"embedding": jnp.asarray(rng.normal(size=(VOCAB, IN)), jnp.float32)},
        "proj": {
            "kernel": jnp.asarray(0.3 * rng.normal(size=(OUT, IN)), jnp.float32),
            "bias": jnp.asarray(0.1 * rng.normal(size=OUT), jnp.float32),
        },
    }


def _forward64(table, kernel, bias, ids) -> np.ndarray:
    h = np.asarray(table, np.float64)[ids] * np.sqrt(IN)
    return h @ np.asarray(kernel, np.float64).T + np.asarray(bias, np.float64)


def _randomise(adapters, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(0.5 * rng.normal(size=v.shape), v.dtype), adapters)


def _tol(table, kernel, bias, ids) -> float:
    mags = _forward64(np.abs(table), np.abs(kernel), np.abs(bias), ids)
    return 16 * EPS * float(mags.max())


def test_linen_custom_layer_and_scaled_embed_subclass():
    model, ids, params = LinenModel(), _ids(0), _linen_params(1)
    adapted = jlora.linen.lora(
        model, LoraConfig(targets=".*(kernel|embedding)", rank=2), layers=CONV1D
    )
    assert adapted.infer_layouts(params, ids) == {"embed/embedding": "vo", "proj/kernel": "oi"}
    adapters = adapted.init_adapters(jax.random.key(0), params, ids)
    assert adapters["proj"]["kernel"].a.shape == (IN, 2)  # a spans the fan-in, whatever the order
    assert adapters["proj"]["kernel"].b.shape == (2, OUT)
    # Eager: the same primitives on the same shapes, plus exact zeros.
    np.testing.assert_array_equal(
        adapted.apply(params, adapters, ids), model.apply({"params": params}, ids)
    )
    adapters = _randomise(adapters, 2)
    got = jax.jit(adapted.apply)(params, adapters, ids)
    merged = jlora.merge(params, adapters)
    d = jax.tree.map(lambda v: np.asarray(v, np.float64), jlora.delta(adapters))
    table = np.asarray(params["embed"]["embedding"], np.float64) + d["embed"]["embedding"]
    kernel = np.asarray(params["proj"]["kernel"], np.float64) + d["proj"]["kernel"]
    bias = params["proj"]["bias"]
    want = _forward64(table, kernel, bias, ids)
    # The term is added once, inside the parent's call: a term added after the scaling (or twice)
    # would be off by (sqrt(IN) - 1) times the embedding term, far above this bound.
    np.testing.assert_allclose(got, want, rtol=0, atol=_tol(table, kernel, bias, ids))
    np.testing.assert_allclose(
        model.apply({"params": merged}, ids), want, rtol=0, atol=_tol(table, kernel, bias, ids)
    )
    assert merged["proj"]["kernel"].shape == (OUT, IN)


def test_linen_without_the_declaration_names_the_fix():
    adapted = jlora.linen.lora(LinenModel(), LoraConfig(targets=".*proj/kernel"))
    with pytest.raises(
        TargetError, match=r"proj/kernel: the module at 'proj' is a test_custom_layers.LinenConv1D"
    ) as e:
        adapted.init_adapters(jax.random.key(0), _linen_params(3), _ids(4))
    assert "layers={cls: jlora.CustomLayer(...)}" in str(e.value)


class LinenReadsKernel(nn.Dense):
    """Overrides __call__ and reads its kernel directly: no place for the term."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features))


def test_linen_override_that_skips_the_parent_method():
    adapted = jlora.linen.lora(LinenReadsKernel(3), LoraConfig(targets="kernel"))
    params = {"kernel": jnp.ones((IN, 3))}
    with pytest.raises(TargetError, match=r"kernel: .* subclass overrides the method without"):
        adapted.init_adapters(jax.random.key(0), params, jnp.ones((2, IN)))


def test_custom_term_and_bad_declarations():
    halved = CustomLayer(layout="oi", term=lambda m, x, f: 0.5 * jlora.ops.dense_branch(x, f))
    f = jlora.LoraFactors(jnp.ones((IN, 1)), jnp.ones((1, OUT)), 1.0, jlora.Layout.parse("oi"))
    np.testing.assert_array_equal(
        halved.compute(None, jnp.ones((2, IN)), f), np.full((2, OUT), 3.0)
    )
    with pytest.raises(ConfigError, match=r"CustomLayer.layout: layout 'xo' is not a layout"):
        CustomLayer(layout="xo")
    with pytest.raises(ConfigError, match=r"CustomLayer.term: 3 is not callable"):
        CustomLayer(term=3)
    with pytest.raises(TypeError, match=r"layers= key 'Conv1D' is not a class"):
        jlora.linen.lora(LinenModel(), LoraConfig(targets="k"), layers={"Conv1D": CustomLayer()})
    with pytest.raises(TypeError, match=r"layers\[LinenConv1D\] is a dict; expected a jlora"):
        jlora.nnx.lora(
            nnx.Linear(2, 2, rngs=nnx.Rngs(0)),
            LoraConfig(targets="k"),
            rngs=0,
            layers={LinenConv1D: {"layout": "oi"}},
        )


class NnxConv1D(nnx.Module):
    def __init__(self, fan_in: int, fan_out: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jnp.zeros((fan_out, fan_in)))
        self.bias = nnx.Param(jnp.zeros((fan_out,)))

    def __call__(self, x):
        y = x @ self.kernel[...].T
        return y + jnp.broadcast_to(self.bias[...], y.shape)


class NnxScaledEmbed(nnx.Embed):
    def __call__(self, ids):
        return super().__call__(ids) * jnp.sqrt(float(self.features))


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = NnxScaledEmbed(VOCAB, IN, rngs=rngs)
        self.proj = NnxConv1D(IN, OUT, rngs=rngs)

    def __call__(self, ids):
        return self.proj(self.embed(ids))


def test_nnx_custom_layer_and_scaled_embed_subclass():
    model, ids = materialise(NnxModel, seed=5), _ids(6)
    base = model(ids)
    config = LoraConfig(targets=".*(kernel|embedding)", rank=2)
    jlora.nnx.lora(model, config, rngs=0, layers={NnxConv1D: CustomLayer(layout="oi")})
    assert isinstance(model.embed, NnxScaledEmbed) and isinstance(model.proj, NnxConv1D)
    assert model.proj.lora_a.shape == (IN, 2)
    np.testing.assert_array_equal(model(ids), base)  # eager, plus exact zeros
    adapters = _randomise(jlora.nnx.to_adapters(model), 7)
    jlora.nnx.set_adapters(model, adapters)
    d = jax.tree.map(lambda v: np.asarray(v, np.float64), jlora.delta(adapters))
    table = np.asarray(model.embed.embedding[...], np.float64) + d["embed"]["embedding"]
    kernel = np.asarray(model.proj.kernel[...], np.float64) + d["proj"]["kernel"]
    bias = model.proj.bias[...]
    want = _forward64(table, kernel, bias, ids)
    np.testing.assert_allclose(model(ids), want, rtol=0, atol=_tol(table, kernel, bias, ids))
    plain = jlora.nnx.merge(model)
    assert type(plain.embed) is NnxScaledEmbed and type(plain.proj) is NnxConv1D
    np.testing.assert_allclose(plain(ids), want, rtol=0, atol=_tol(table, kernel, bias, ids))


class NnxReadsKernel(nnx.Linear):
    def __call__(self, x):
        return x @ self.kernel[...]


class NnxDoubled(nnx.Linear):
    def __call__(self, x):
        return 2 * super().__call__(x)


def test_nnx_overrides_with_and_without_super():
    config = LoraConfig(targets="kernel", rank=1)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 3)), jnp.float32)
    doubled = jlora.nnx.lora(materialise(lambda r: NnxDoubled(3, 2, rngs=r)), config, rngs=0)
    assert type(doubled).__name__ == "LoraNnxDoubled" and isinstance(doubled, NnxDoubled)
    adapters = _randomise(jlora.nnx.to_adapters(doubled), 9)
    jlora.nnx.set_adapters(doubled, adapters)
    w = np.asarray(doubled.kernel[...], np.float64) + np.asarray(jlora.delta(adapters)["kernel"])
    want = 2 * (np.asarray(x, np.float64) @ w + np.asarray(doubled.bias[...], np.float64))
    np.testing.assert_allclose(doubled(x), want, rtol=0, atol=64 * EPS * np.abs(want).max())
    skips = jlora.nnx.lora(materialise(lambda r: NnxReadsKernel(3, 2, rngs=r)), config, rngs=0)
    with pytest.raises(
        AdapterMismatchError,
        match=r"\(root\): NnxReadsKernel.__call__ overrides nnx.Linear.__call__ without calling it",
    ):
        skips(x)


def test_a_wrapper_holding_a_linen_module_names_its_module():
    class PretrainedWrapper:  # what a Hugging Face Flax model looks like from outside
        def __init__(self):
            self.module = nn.Dense(3)
            self.params = {}

    with pytest.raises(
        TypeError,
        match=r"expected a flax.linen Module, got PretrainedWrapper, a wrapper holding a Linen "
        r"module; pass its .module",
    ):
        jlora.linen.lora(PretrainedWrapper(), LoraConfig(targets="kernel"))


class JittedModel(nn.Module):
    """Its __call__ is wrapped in nn.jit (as Google's gemma package does)."""

    @nn.jit
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="dense")(x)


def test_layers_inside_nn_jit_are_seen_on_every_trace():
    model, x = JittedModel(), jnp.ones((1, IN))
    params = {"dense": {"kernel": jnp.ones((IN, 3)), "bias": jnp.zeros(3)}}
    adapted = jlora.linen.lora(model, LoraConfig(targets=".*dense/kernel", rank=1))
    for _ in range(2):  # nn.jit caches the first trace; the second must still see the layers
        adapters = adapted.init_adapters(jax.random.key(0), params, x)
    assert adapted.infer_layouts(params, x) == {"dense/kernel": "io"}
    adapters = _randomise(adapters, 10)
    f = adapters["dense"]["kernel"]
    want = np.ones((1, IN)) @ (np.ones((IN, 3)) + f.scale * np.asarray(f.a, np.float64) @ f.b)
    for _ in range(2):
        got = adapted.apply(params, adapters, x)
        np.testing.assert_allclose(got, want, rtol=0, atol=32 * EPS * np.abs(want).max())


class GemmaStyleEinsum(nn.Module):
    """Google's gemma package's Linen einsum: the equation is a call argument, before the input."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn, x):
        return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(), self.shape))


class GemmaStyleAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = GemmaStyleEinsum((4, IN, 3), name="q")("BTD,NDH->BTNH", x)
        return GemmaStyleEinsum((4, 3, OUT), name="o")("BTNH,NHD->BTD", q)


def _einsum_reference(x, wq, wo):
    q = np.einsum("BTD,NDH->BTNH", np.asarray(x, np.float64), wq)
    out = np.einsum("BTNH,NHD->BTD", q, wo)
    mags = np.einsum("BTNH,NHD->BTD", np.einsum("BTD,NDH->BTNH", np.abs(x), np.abs(wq)), np.abs(wo))
    return out, 32 * EPS * mags.max()


def test_linen_einsum_layer_declared_by_where_its_equation_is():
    model = GemmaStyleAttention()
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(2, 3, IN)), jnp.float32)
    params = {
        "q": {"w": jnp.asarray(0.3 * rng.normal(size=(4, IN, 3)), jnp.float32)},
        "o": {"w": jnp.asarray(0.3 * rng.normal(size=(4, 3, OUT)), jnp.float32)},
    }
    layers = {GemmaStyleEinsum: CustomLayer(param="w", equation=0, input=1)}
    adapted = jlora.linen.lora(model, LoraConfig(targets=".*/w", rank=2), layers=layers)
    assert adapted.infer_layouts(params, x) == {"q/w": "oio", "o/w": "iio"}
    adapters = _randomise(adapted.init_adapters(jax.random.key(0), params, x), 12)
    d = jax.tree.map(lambda v: np.asarray(v, np.float64), jlora.delta(adapters))
    want, tol = _einsum_reference(
        x,
        np.asarray(params["q"]["w"], np.float64) + d["q"]["w"],
        np.asarray(params["o"]["w"], np.float64) + d["o"]["w"],
    )
    np.testing.assert_allclose(jax.jit(adapted.apply)(params, adapters, x), want, rtol=0, atol=tol)
    with pytest.raises(ConfigError, match=r"an einsum layer \(equation=...\) takes its layout"):
        CustomLayer(param="w", equation=0, layout="oio")


class NnxHeldEinsum(nnx.Module):
    def __init__(self, einsum_str: str, shape: tuple[int, ...]):
        self.einsum_str = einsum_str
        self.w = nnx.Param(jnp.zeros(shape))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


class NnxHeldAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = NnxHeldEinsum("BTD,NDH->BTNH", (4, IN, 3))
        self.o = NnxHeldEinsum("BTNH,NHD->BTD", (4, 3, OUT))

    def __call__(self, x):
        return self.o(self.q(x))


def test_nnx_einsum_layer_holding_its_equation():
    model = materialise(NnxHeldAttention, seed=13)
    x = jnp.asarray(np.random.default_rng(14).normal(size=(2, 3, IN)), jnp.float32)
    held = {NnxHeldEinsum: CustomLayer(param="w", equation="einsum_str")}
    jlora.nnx.lora(model, LoraConfig(targets=".*/w", rank=2), rngs=0, layers=held)
    assert model.q.lora_a.shape == (IN, 2) and model.q.lora_b.shape == (2, 4, 3)
    adapters = _randomise(jlora.nnx.to_adapters(model), 15)
    jlora.nnx.set_adapters(model, adapters)
    d = jax.tree.map(lambda v: np.asarray(v, np.float64), jlora.delta(adapters))
    want, tol = _einsum_reference(
        x,
        np.asarray(model.q.w[...], np.float64) + d["q"]["w"],
        np.asarray(model.o.w[...], np.float64) + d["o"]["w"],
    )
    np.testing.assert_allclose(model(x), want, rtol=0, atol=tol)
    by_call = {NnxHeldEinsum: CustomLayer(param="w", equation=0)}
    with pytest.raises(TargetError, match=r"o: .* the equation must be a string attribute"):
        jlora.nnx.lora(
            materialise(NnxHeldAttention), LoraConfig(targets=".*/w"), rngs=0, layers=by_call
        )
