"""`jlora.remat_policy`: what it saves, and a scanned, rematted LoRA step equal to the plain one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import jlora.linen
import jlora.nnx


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="ln")(x)
        h = x + nn.Dense(16, name="proj")(h)
        return h + nn.Dense(16, name="down")(nn.gelu(nn.Dense(32, name="up")(h))), None


class _Stack(nn.Module):
    policy: object = None

    @nn.compact
    def __call__(self, x):
        block = _Block if self.policy is None else nn.remat(_Block, policy=self.policy)
        scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return scan(name="layers")(x, None)[0]


def _aval(*shape):
    return jax.core.ShapedArray(shape, jnp.float32)


def _dot(lhs, rhs):
    return jax.lax.dot_general_p, _aval(*lhs), _aval(*rhs)


def test_saves_large_contractions_only():
    policy = jlora.remat_policy(max_rank=8)
    plain = (((1,), (0,)), ((), ()))
    assert policy(*_dot((5, 16), (16, 4)), dimension_numbers=plain)  # base / x a
    assert not policy(*_dot((5, 8), (8, 16)), dimension_numbers=plain)  # (x a) b
    batched = (((2,), (1,)), ((0,), (0,)))
    assert not policy(*_dot((2, 5, 16), (2, 16, 4)), dimension_numbers=batched)
    assert not policy(jax.lax.exp_p, _aval(5, 16))
    multi = (((1, 2), (0, 1)), ((), ()))
    assert policy(*_dot((5, 3, 4), (3, 4, 2)), dimension_numbers=multi)  # 12 > 8


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "8"])
def test_bad_max_rank(bad):
    with pytest.raises(jlora.ConfigError, match="max_rank is .*expected a positive int"):
        jlora.remat_policy(max_rank=bad)


def test_scanned_remat_step_equals_the_plain_step():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    config = jlora.LoraConfig(targets=["proj", "up", "down"], rank=4, alpha=8.0)
    plain = _Stack()
    # Compiled inits (eagerly, each op would compile a program of its own).
    params = jax.jit(plain.init)(jax.random.key(0), x)["params"]
    init = jlora.linen.lora(plain, config).init_adapters
    # b is zero at init; a nonzero b makes the gradient of a (the one needing the inputs) nonzero
    adapters = jax.jit(lambda k: jax.tree.map(lambda t: t + 0.1, init(k, params, x)))(
        jax.random.key(1)
    )
    target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grads(model):
        lora = jlora.linen.lora(model, config)
        loss = lambda ad: jnp.mean((lora.apply(params, ad, x) - target) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(adapters)

    (loss0, g0), (loss1, g1) = grads(plain), grads(_Stack(jlora.remat_policy(max_rank=4)))
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        scale = float(jnp.abs(a).max())
        assert scale > 0
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale)


class _NnxStack(nnx.Module):
    """Two ``nnx.Linear`` + GELU blocks stacked by ``nnx.vmap``, run by ``nnx.scan``."""

    def __init__(self, policy):
        self.policy = policy
        self.layers = nnx.split_rngs(splits=2)(
            nnx.vmap(lambda r: nnx.Linear(16, 16, rngs=r), in_axes=0, out_axes=0)
        )(nnx.Rngs(0))

    def __call__(self, x):
        body = lambda x, layer: x + nnx.gelu(layer(x))  # noqa: E731
        if self.policy is not None:
            body = nnx.remat(body, policy=self.policy)
        return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)


def test_nnx_scanned_remat_gradient_equals_the_plain_one():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    config = jlora.LoraConfig(targets=".*kernel", rank=2)
    out = []
    for policy in (None, jlora.remat_policy(max_rank=2)):
        model = jlora.nnx.lora(_NnxStack(policy), config, rngs=0)
        draws = np.random.default_rng(2)  # the same nonzero factors for both models
        jlora.nnx.set_adapters(model, jax.tree.map(
            lambda t: jnp.asarray(0.1 * draws.standard_normal(t.shape), t.dtype),
            jlora.nnx.to_adapters(model),
        ))
        loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
        step = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, jlora.nnx.LoraParam)))
        loss_value, grads = step(model)
        out.append((loss_value, nnx.to_pure_dict(grads)))
    (loss0, g0), (loss1, g1) = out
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        scale = float(jnp.abs(a).max())
        assert scale > 0
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale)
