import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numerics import assert_same_adam_trajectory
from trees import random_factors, transformer_params

import jlora
from jlora import LoraConfig
from jlora.optim import freeze_base, labels, lora_plus, mask, scale_by_lora_plus

CONFIG = LoraConfig(targets=(r".*/kernel", r"embed/embedding"), rank=3, alpha=6)
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=6)

# optax mixes int32 step counts with floats, which the strict test promotion refuses.
standard_promotion = jax.numpy_dtype_promotion("standard")


def _adapters(seed=0):
    params = transformer_params(layers=1)
    shapes = jax.eval_shape(lambda: jlora.init(jax.random.key(seed), params, CONFIG))
    return params, random_factors(shapes, seed=seed + 1)


def _grads(adapters, step):
    # Parameter-dependent gradients, so that optimizer trajectories diverge on any difference.
    noise = random_factors(adapters, seed=100 + step)
    return jax.tree.map(lambda p, n: 0.3 * p + n, adapters, noise)


def _run(tx, adapters, steps=5, jit=True):
    def step(adapters, state, grads):
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state

    step = jax.jit(step) if jit else step
    with standard_promotion:
        state = tx.init(adapters)
        for t in range(steps):
            adapters, state = step(adapters, state, _grads(adapters, t))
    return adapters


OPTIMIZERS = {
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr, weight_decay=0.1),
    "sgd_momentum": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
}


def _reference(make, ratio, adapters):
    # b gets its own optimizer, configured with the schedule times the ratio.
    return optax.partition(
        {"a": make(SCHEDULE), "b": make(lambda t: ratio * SCHEDULE(t))},
        labels(adapters, a="a", b="b", other="unused"),
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("ratio", [16.0, 3.0])
def test_lora_plus_equals_separately_configured_optimizers(name, ratio):
    make = OPTIMIZERS[name]
    _, adapters = _adapters()
    got = _run(lora_plus(make(SCHEDULE), ratio), adapters)
    expected = _run(_reference(make, ratio, adapters), adapters)
    # Compiled separately, XLA may contract p + lr * u into a fused multiply-add in one program
    # and not the other: agreement to round-off over five steps of at most b's learning rate.
    lr = ratio * float(np.max([SCHEDULE(t) for t in range(5)]))
    for x, y, start in zip(*map(jax.tree.leaves, (got, expected, adapters)), strict=True):
        assert_same_adam_trajectory(x, y, start, lr=lr, steps=5)


def test_lora_plus_is_bit_exact_for_a_power_of_two_ratio_op_by_op():
    # Run op by op (no fusion), scaling b's updates by 16 after AdamW equals AdamW with 16x the
    # scheduled learning rate bit for bit: a power-of-two scale commutes with rounding.
    make = OPTIMIZERS["adamw"]
    _, adapters = _adapters()
    got = _run(lora_plus(make(SCHEDULE), 16.0), adapters, steps=3, jit=False)
    expected = _run(_reference(make, 16.0, adapters), adapters, steps=3, jit=False)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(x, y)


def test_lora_plus_scales_b_and_leaves_a_as_the_optimizer_has_it():
    _, adapters = _adapters()
    grads = _grads(adapters, 0)
    with standard_promotion:
        plain = optax.sgd(0.5)
        boosted = lora_plus(optax.sgd(0.5), ratio=4.0)
        u_plain, _ = plain.update(grads, plain.init(adapters))
        u_plus, _ = boosted.update(grads, boosted.init(adapters))
    f_plain = u_plain["layers_0"]["attn"]["query"]["kernel"]
    f_plus = u_plus["layers_0"]["attn"]["query"]["kernel"]
    # Exact: a's updates are the same ops; b's are scaled by a power of two, which commutes with
    # rounding; and -0.5 g is one exact scaling too.
    np.testing.assert_array_equal(f_plus.a, f_plain.a)
    np.testing.assert_array_equal(f_plus.b, 4.0 * np.asarray(f_plain.b))
    g = np.asarray(grads["layers_0"]["attn"]["query"]["kernel"].b, np.float64)
    np.testing.assert_allclose(f_plus.b, -0.5 * 4.0 * g, rtol=1e-6)


def test_scale_by_lora_plus_passes_non_factor_leaves_and_keeps_dtype():
    f = jlora.LoraFactors(
        jnp.ones((3, 2), jnp.bfloat16), jnp.ones((2, 4), jnp.bfloat16), 1.0, jlora.Layout(1, 1)
    )
    tree = {"w": f, "bias": jnp.full((4,), 2.0)}
    tx = scale_by_lora_plus(16.0)
    updates, state = tx.update(tree, tx.init(tree))
    assert updates["w"].b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(updates["w"].b, np.full((2, 4), 16.0, np.float32))
    assert updates["bias"] is tree["bias"]
    assert jax.tree.leaves(state) == []


@pytest.mark.parametrize("ratio", [0, -2.0, True, "16", float("nan")])
def test_lora_plus_rejects_bad_ratios(ratio):
    with pytest.raises(ValueError, match=r"LoRA\+ ratio .* is invalid; expected a number > 0"):
        lora_plus(optax.sgd(0.1), ratio)


def test_labels_and_masks_mark_every_factor_leaf():
    params, adapters = _adapters()
    tree = {"params": params, "lora": adapters}
    tags = labels(tree, a="A", b="B", other="base")
    assert jax.tree.structure(tags) == jax.tree.structure(tree)
    n_factors = len(jlora._merge.factors_by_path(adapters))
    values = jax.tree.leaves(tags)
    assert values.count("A") == values.count("B") == n_factors
    assert values.count("base") == len(jax.tree.leaves(params))
    assert tags["lora"]["embed"]["embedding"].b == "B"
    on = mask(tree)
    assert sum(jax.tree.leaves(on)) == 2 * n_factors
    off = mask(tree, invert=True)
    assert [not x for x in jax.tree.leaves(on)] == jax.tree.leaves(off)


@pytest.mark.parametrize("fn", [labels, mask])
def test_labels_refuse_a_tree_without_factors(fn):
    params, adapters = _adapters()
    plain = jax.tree.map(np.asarray, {"a": adapters["embed"]["embedding"].a})
    for tree in (params, plain):
        with pytest.raises(ValueError, match=r"holds no jlora.LoraFactors, so every leaf would be"):
            fn(tree)


def _loss(tree, x):
    params, adapters = tree["params"], tree["lora"]
    h = x @ params["layers_0"]["mlp"]["up"]["kernel"]
    h = h + jlora.ops.dense_branch(x, adapters["layers_0"]["mlp"]["up"]["kernel"])
    return jnp.mean(jnp.tanh(h) ** 2)


def test_freeze_base_keeps_the_base_bit_identical_and_out_of_the_state():
    params, adapters = _adapters()
    params = jax.tree.map(jnp.asarray, params)
    tree = {"params": params, "lora": adapters}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32))
    tx = freeze_base(lora_plus(optax.adam(1e-2)))
    separate = lora_plus(optax.adam(1e-2))
    step = jax.jit(jax.grad(_loss))
    with standard_promotion:
        state = tx.init(tree)
        alone, alone_state = adapters, separate.init(adapters)
        for _ in range(3):
            grads = step(tree, x)
            updates, state = tx.update(grads, state, tree)
            tree = optax.apply_updates(tree, updates)
            alone_grads = step({"params": params, "lora": alone}, x)["lora"]
            alone_updates, alone_state = separate.update(alone_grads, alone_state, alone)
            alone = optax.apply_updates(alone, alone_updates)
    for x0, x1 in zip(jax.tree.leaves(params), jax.tree.leaves(tree["params"]), strict=True):
        np.testing.assert_array_equal(  # exact: the frozen base is never written
            np.asarray(x0).view(np.uint32), np.asarray(x1).view(np.uint32)
        )
    # The factors train exactly as they would as their own tree: exact, as both runs take the
    # same compiled gradient and the same op-by-op Adam arithmetic on the same shapes.
    for x0, x1 in zip(jax.tree.leaves(alone), jax.tree.leaves(tree["lora"]), strict=True):
        np.testing.assert_array_equal(x0, x1)
    trained = tree["lora"]["layers_0"]["mlp"]["up"]["kernel"]
    assert not np.array_equal(trained.b, adapters["layers_0"]["mlp"]["up"]["kernel"].b)
    # Optimizer state: Adam's two moments of the factors, a step count, and nothing of the base.
    assert jax.tree.leaves(state.inner_states["frozen"]) == []
    n_factor = sum(x.size for x in jax.tree.leaves(adapters))
    state_sizes = [x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    assert sum(state_sizes) == 2 * n_factor


def test_mask_with_set_to_zero_freezes_the_base():
    params, adapters = _adapters()
    tree = {"params": params, "lora": adapters}
    tx = optax.chain(
        optax.masked(optax.set_to_zero(), mask(tree, invert=True)),
        optax.masked(optax.sgd(0.1), mask(tree)),
    )
    grads = jax.tree.map(lambda p: np.ones_like(p), tree)
    with standard_promotion:
        updates, _ = tx.update(grads, tx.init(tree), tree)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["params"]))
    assert all(np.allclose(u, -0.1) for u in jax.tree.leaves(updates["lora"]))
