"""AdaLoRA through the Flax transforms: the triplets as plain factors (adalora_to_lora) in the loss.

The transforms take LoRA factors; ``adalora_to_lora(ada, drop_masked=False)`` is traceable and
differentiable, so the AdaLoRA loop of ``jlora.variants._adalora`` runs on an unmodified Linen
model (``LoraModel.apply``) or NNX model (``nnx.merge`` of ``jlora.nnx.to_state``) as it does on
``jlora.merge``. These tests run that loop and check what it promises.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models_linen import MLP

import jlora
import jlora.linen
import jlora.nnx
from jlora.variants import (
    adalora_budget,
    adalora_init,
    adalora_mask,
    adalora_orth,
    adalora_ranks,
    adalora_state,
    adalora_to_lora,
    adalora_total_rank,
    adalora_update_importance,
)

RANK, STEPS, TARGET = 4, 24, 5  # budget 3 weights x 4 = 12 falls to 5


def _loop(forward, params_like, config, x, y, seed):
    """AdaLoRA training: Adam on (p, lam, q), importance after each step, masking on schedule."""
    ada = adalora_init(jax.random.key(seed), params_like, config)
    tx = optax.adam(1e-2)
    opt, state = tx.init(ada), adalora_state(ada)

    def loss(ada):
        out = forward(adalora_to_lora(ada, drop_masked=False), x)
        return jnp.mean((out - y) ** 2) + 0.1 * adalora_orth(ada)

    @jax.jit
    def step(ada, opt):
        value, grads = jax.value_and_grad(loss)(ada)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            updates, opt = tx.update(grads, opt, ada)
        return optax.apply_updates(ada, updates), opt, grads, value

    first = None
    for t in range(STEPS):
        ada, opt, grads, value = step(ada, opt)
        first = first if first is not None else grads
        state = adalora_update_importance(state, ada, grads)
        budget = adalora_budget(t, initial=3 * RANK, target=TARGET, warmup=4, final=4, total=STEPS)
        if t >= 4:
            ada = adalora_mask(ada, state, budget)
    return ada, first


def _mlp():
    model = MLP()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 10)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x, y


@pytest.mark.slow  # fast twin: test_nnx_user_trains_adalora_through_to_state (the same schedule)
def test_linen_user_trains_adalora_and_exports_plain_lora():
    model, params, x, y = _mlp()
    config = jlora.LoraConfig(targets=".*kernel", rank=RANK)
    adapted = jlora.linen.lora(model, config)
    ada, grads = _loop(lambda lora, x: adapted.apply(params, lora, x), params, config, x, y, 1)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        # p and q get gradients through the model; lam = 0 at init so p, q move only via orth
        # at step 0, while lam gets the task gradient from the first step on.
        assert float(jnp.abs(g).max()) > 0, path
    assert adalora_total_rank(ada) == 3 * RANK  # b0: the triplets there are
    ranks = adalora_ranks(ada)
    assert sum(ranks.values()) == TARGET  # the budget is met exactly
    assert set(ranks) == {"up/kernel", "mid/kernel", "head/kernel"}
    # Masked triplets contribute exactly 0: the dropped-rank adapters compute the same model.
    full = adapted.apply(params, adalora_to_lora(ada, drop_masked=False), x)
    kept = adalora_to_lora(ada)
    assert sum(f.rank for f in jax.tree.leaves(kept, is_leaf=_is_factors)) == TARGET
    np.testing.assert_allclose(adapted.apply(params, kept, x), full, atol=1e-6, rtol=0)
    merged = model.apply({"params": jlora.merge(params, kept)}, x)
    np.testing.assert_allclose(merged, full, atol=1e-5 * float(jnp.abs(full).max()), rtol=0)


def _is_factors(x):
    return isinstance(x, jlora.LoraFactors)


def test_nnx_user_trains_adalora_through_to_state():
    layers = (nnx.Linear(10, 12, rngs=nnx.Rngs(0)), nnx.Linear(12, 5, rngs=nnx.Rngs(1)))
    model = nnx.Sequential(*layers)
    config = jlora.LoraConfig(targets=".*kernel", rank=RANK)
    jlora.nnx.lora(model, config, rngs=nnx.Rngs(2))
    graphdef, _, rest = nnx.split(model, jlora.nnx.LoraParam, ...)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _, _, x, y = _mlp()

    def forward(lora, x):
        return nnx.merge(graphdef, jlora.nnx.to_state(model, lora), rest)(x)

    # Compiled (eagerly, each op would compile a program of its own).
    ada = jax.jit(lambda k: jax.tree.map(lambda v: v + 0.05, adalora_init(k, params, config)))(
        jax.random.key(3)
    )
    total = lambda a: jnp.sum(forward(adalora_to_lora(a, drop_masked=False), x))  # noqa: E731
    g = jax.jit(jax.grad(total))(ada)
    assert all(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(g))
    # The result loads into the model as plain LoRA, and the layer computes W0 + s p diag(lam) q.
    jlora.nnx.set_adapters(model, adalora_to_lora(ada, drop_masked=False))
    want = model.layers[0].kernel[...] + jlora.delta(adalora_to_lora(ada))["layers"]["0"]["kernel"]
    got = nnx.to_pure_dict(nnx.state(jlora.nnx.merge(model), nnx.Param))["layers"][0]["kernel"]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("drop", [True, False])
def test_adalora_to_lora_keeps_layouts_the_linen_model_checks(drop):
    model, params, x, _ = _mlp()
    config = jlora.LoraConfig(targets=".*kernel", rank=RANK)
    ada = adalora_init(jax.random.key(4), params, config)
    lora = adalora_to_lora(jax.tree.map(lambda v: v + 0.1, ada), drop_masked=drop)
    # apply checks every factor's layout against the module's: the AdaLoRA layouts pass.
    jlora.linen.lora(model, config).apply(params, lora, x)
