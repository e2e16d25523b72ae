"""jlora.quant.quantized_matmul: block-wise dequantisation, equal values and input gradients,
and a LoRA step (jlora.linen) that keeps no float copy of a quantised weight."""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.linen
import jlora.quant as jq
from jlora.quant._product import block_rows
from tests.numerics import abs_chain, assert_within_roundoff, f64


def _normal(shape, seed, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype)


@pytest.mark.parametrize(("kind", "shape", "n_in"), [("nf4", (256, 128), 1),
                                                     ("int8", (256, 96), 1),
                                                     ("nf4", (4, 64, 2, 64), 2)])  # fmt: skip
def test_value_and_input_gradient_equal_the_dequantised_product(kind, shape, n_in):
    roles = "i" * n_in + "o" * (len(shape) - n_in)
    config = jlora.LoraConfig(targets="w", rank=1, layouts={"w": roles})
    q = jq.quantize({"w": _normal(shape, 0, 0.05)}, config, kind=kind)["w"]
    w = f64(jax.jit(jq.dequantize)(q)).reshape(int(np.prod(shape[:n_in])), -1)
    x = _normal((3, *shape[:n_in]), 1)
    # Compiled (eagerly, each op would compile a program of its own).
    y = jax.jit(lambda x, q: jq.quantized_matmul(x, q, n_in=n_in))(x, q)
    assert y.shape == (3, *shape[n_in:]) and y.dtype == jnp.float32
    x2 = f64(x).reshape(3, -1)
    k = x2.shape[1]
    assert_within_roundoff(y.reshape(3, -1), x2 @ w, abs_chain(x2, w), terms=k + 1)
    g = _normal(y.shape, 2)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(jq.quantized_matmul(x, q, n_in=n_in) * g)))(x)
    g2 = f64(g).reshape(3, -1)
    assert_within_roundoff(dx.reshape(3, -1), g2 @ w.T, abs_chain(g2, w.T), terms=w.shape[1])


def test_block_rows_divides_and_bounds_the_block():
    assert block_rows(512) == 64 and block_rows(4096) == 512 and block_rows(48) == 48
    assert block_rows(96 * 7) == 84  # the largest divisor within max(64, 672 // 8)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(4):
            x = nn.tanh(nn.Dense(256)(x))
        return x


def _float_arrays(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _float_arrays(inner)


def test_lora_step_keeps_no_float_copy_of_a_quantised_weight():
    model, x = MLP(), _normal((8, 256), 0)
    # Compiled inits, steps and dequantisation: eagerly, each op would compile a program alone.
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    config = jlora.LoraConfig(targets=".*kernel", rank=4)
    qparams = jq.quantize(params, config, kind="nf4")
    adapted = jlora.linen.lora(model, config)
    adapters = jax.jit(adapted.init_adapters)(jax.random.key(1), jq.abstract(qparams), x)
    adapters = jax.tree.map(lambda t: t + _normal(t.shape, 2, 0.1), adapters)

    def loss(a, p):
        return jnp.sum(adapted.apply(p, a, x) ** 2)

    step = jax.grad(loss)
    # Nowhere in the forward or the backward pass is there a float array of a weight's shape.
    avals = list(_float_arrays(jax.make_jaxpr(step)(adapters, qparams).jaxpr))
    assert not [a for a in avals if a.shape == (256, 256)]
    weights = 4 * 256 * 256 * 4  # bytes of the four float32 dequantised weights
    compiled = jax.jit(step).lower(adapters, qparams).compile()
    blockwise = compiled.memory_analysis()
    with mock.patch("jlora.linen._intercept.linen_base", lambda *a, **k: None):
        whole = (
            jax.jit(lambda a, p: step(a, p)).lower(adapters, qparams).compile().memory_analysis()
        )
    if blockwise is not None:  # XLA's account: the metadata-box route holds every weight
        assert blockwise.temp_size_in_bytes < weights / 2 < whole.temp_size_in_bytes
    # ... and the gradients are those of the dequantised base, to round-off.
    got = compiled(adapters, qparams)
    want = jax.jit(step)(adapters, jax.jit(jq.dequantize)(qparams))
    for path, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.abs(w).max()),
                                   err_msg=str(path))  # fmt: skip


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dense_general_over_a_quantised_kernel(kind):
    model = nn.DenseGeneral((2, 64), axis=(-2, -1), dtype=jnp.bfloat16)
    x = _normal((3, 4, 64), 0)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    params = {**params, "bias": _normal((2, 64), 3)}
    config = jlora.LoraConfig(targets="kernel", rank=2, layouts={"kernel": "iioo"})
    qparams = jq.quantize(params, config, kind=kind)
    adapted = jlora.linen.lora(model, config)
    adapters = jax.jit(adapted.init_adapters)(jax.random.key(1), jq.abstract(qparams), x)
    adapters = jax.tree.map(lambda t: t + _normal(t.shape, 2, 0.1), adapters)
    apply = jax.jit(adapted.apply)  # one program (eagerly, each op would compile its own)
    dequantized = jax.jit(jq.dequantize)(qparams)
    got, want = apply(qparams, adapters, x), apply(dequantized, adapters, x)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(got), f64(want), rtol=2e-2, atol=2e-2)
    grad = jax.jit(jax.grad(lambda a, p: jnp.sum(apply(p, a, x).astype(jnp.float32) ** 2)))
    for g, w in zip(jax.tree.leaves(grad(adapters, qparams)),
                    jax.tree.leaves(grad(adapters, dequantized)), strict=True):  # fmt: skip
        np.testing.assert_allclose(f64(g), f64(w), rtol=5e-2, atol=5e-2 * float(jnp.abs(w).max()))


def test_bad_input():
    q = jq.quantize({"w": _normal((64, 64), 0)}, "w")["w"]
    with pytest.raises(
        TypeError, match=r"x of shape \(2, 32\) does not end in the weight's fan-in"
    ):
        jq.quantized_matmul(jnp.ones((2, 32)), q)
    with pytest.raises(TypeError, match=r"must be a QuantizedWeight whose first n_in=1 axes"):
        jq.quantized_matmul(jnp.ones((2, 64)), jnp.ones((64, 64)))
    with pytest.raises(TypeError, match=r"can only be read whole, as q\[\.\.\.\] \(got q\[0\]\)"):
        q[0]
