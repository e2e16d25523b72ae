"""ReLoRA: the jagged schedule, the partial optimizer reset, and rank growth through restarts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import f64

import jlora
from jlora.variants import merge_and_reinit, relora_schedule, reset_optimizer_state

# optax mixes int32 step counts with floats, which the strict test promotion refuses.
standard_promotion = jax.numpy_dtype_promotion("standard")


def _authors_schedule(t, *, total, every, warmup, rewarm, min_ratio):
    """The ReLoRA code's ``_get_cosine_schedule_with_multiple_warmups_lambda`` in float64."""
    if t < warmup:
        return t / max(1, warmup)
    restart_step, restart_number = t % every, t // every
    if restart_step < rewarm and t >= every:
        end = (restart_number * every + rewarm - warmup) / max(1, total - warmup)
        decay = 0.5 * (1.0 + math.cos(math.pi * end))
        return restart_step / max(1, rewarm) * (min_ratio + (1.0 - min_ratio) * decay)
    progress = (t - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 7])
def test_schedule_matches_the_authors_lambda(warmup):
    kw = dict(total=120, every=25, warmup=warmup, rewarm=5, min_ratio=0.1)
    lr = relora_schedule(
        3e-3,
        total_steps=120,
        restart_every=25,
        warmup_steps=warmup,
        restart_warmup_steps=5,
        min_ratio=0.1,
    )
    steps = np.arange(130)
    got = jax.jit(jax.vmap(lr))(steps)
    want = np.array([3e-3 * _authors_schedule(int(t), **kw) for t in steps])
    # float32 arithmetic and cosine: a few float32 epsilons relative.
    np.testing.assert_allclose(f64(got), want, rtol=16 * np.finfo(np.float32).eps, atol=1e-12)
    # The defining points: zero right at each restart, back on the cosine after the re-warmup.
    for k in (1, 2, 3, 4):
        assert float(lr(25 * k)) == 0.0
        assert float(lr(25 * k + 5)) == pytest.approx(3e-3 * _authors_schedule(25 * k + 5, **kw))
    assert float(lr(warmup)) == pytest.approx(3e-3)  # the peak, at the end of the first warmup


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(restart_warmup_steps=25), "restart_warmup_steps=25 is not below restart_every=25"),
        (dict(min_ratio=1.5), "min_ratio=1.5 is invalid"),
        (dict(total_steps=0), "total_steps: 0 is invalid"),
        (dict(warmup_steps=-1), "warmup_steps: -1 is invalid"),
    ],
)
def test_schedule_errors(kwargs, match):
    args = dict(total_steps=100, restart_every=25, warmup_steps=5, restart_warmup_steps=5)
    with pytest.raises(ValueError, match=match):
        relora_schedule(1.0, **{**args, **kwargs})


def _factors(rng, shape_a=(6, 2), shape_b=(2, 5)):
    return jlora.LoraFactors(
        jnp.asarray(rng.standard_normal(shape_a), jnp.float32),
        jnp.asarray(rng.standard_normal(shape_b), jnp.float32),
        0.5,
        jlora.Layout(1, 1),
    )


def _top_fraction(x, ratio):
    x = f64(x).reshape(-1)
    keep = x.size - math.floor(ratio * x.size)
    out = np.zeros_like(x)
    order = np.argsort(-np.abs(x), kind="stable")[:keep]
    out[order] = x[order]
    return out, keep


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_reset_keeps_exactly_the_top_fraction_of_each_moment(ratio):
    rng = np.random.default_rng(0)
    tree = {"head": jnp.ones(3), "lora": {"q": _factors(rng), "v": _factors(rng, (10, 2), (2, 4))}}
    # A chain (clip before Adam) and a partition: the moments sit deep in the state.
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.partition(
            {"lora": optax.adam(1e-2), "frozen": optax.sgd(1e-2, momentum=0.9)},
            {"head": "frozen", "lora": {"q": "lora", "v": "lora"}},
        ),
    )
    with standard_promotion:
        state = tx.init(tree)
        for seed in range(3):
            grads = jax.tree.map(
                lambda x, s=seed: jnp.asarray(
                    np.random.default_rng(s).standard_normal(x.shape), x.dtype
                ),
                tree,
            )
            state = tx.update(grads, state, tree)[1]
    pruned = jax.jit(reset_optimizer_state, static_argnums=1)(state, ratio)
    assert jax.tree.structure(pruned) == jax.tree.structure(state)
    adam = state[1].inner_states["lora"].inner_state[0]
    adam_pruned = pruned[1].inner_states["lora"].inner_state[0]
    for moment in ("mu", "nu"):
        for name in ("q", "v"):
            for factor in ("a", "b"):
                before = getattr(getattr(adam, moment)["lora"][name], factor)
                after = getattr(getattr(adam_pruned, moment)["lora"][name], factor)
                want, keep = _top_fraction(before, ratio)
                np.testing.assert_array_equal(f64(after).reshape(-1), want)
                assert int(jnp.count_nonzero(after)) == keep
    # The count and the plain parameter's momentum are untouched.
    assert int(adam_pruned.count) == int(adam.count) == 3
    momentum = state[1].inner_states["frozen"].inner_state[0].trace["head"]
    np.testing.assert_array_equal(
        pruned[1].inner_states["frozen"].inner_state[0].trace["head"], momentum
    )


def test_reset_with_ties_keeps_exactly_the_count():
    f = jlora.LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)), 1.0, jlora.Layout(1, 1))
    out = reset_optimizer_state({"m": f}, 0.5)["m"]
    assert int(jnp.count_nonzero(out.a)) == 4 and int(jnp.count_nonzero(out.b)) == 3


def test_reset_errors():
    with pytest.raises(ValueError, match=r"ratio=1.5 is invalid; expected the fraction"):
        reset_optimizer_state({}, 1.5)
    with pytest.raises(ValueError, match=r"holds no jlora.LoraFactors node"):
        reset_optimizer_state(optax.adam(1e-3).init({"w": jnp.ones((2, 2))}), 0.9)


def test_rank_grows_by_r_per_restart():
    """A ReLoRA loop (Adam, the jagged schedule, the reset): rank(W_k - W_0) = k r exactly."""
    rng = np.random.default_rng(1)
    fan_in, fan_out, rank, every, restarts = 12, 10, 2, 15, 4
    w0 = jnp.asarray(rng.standard_normal((fan_in, fan_out)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((64, fan_in)), jnp.float32)
    y = x @ jnp.asarray(rng.standard_normal((fan_in, fan_out)), jnp.float32)  # full-rank target
    config = jlora.LoraConfig(targets="w", rank=rank, alpha=2.0)
    params = {"w": w0}
    adapters = jlora.init(jax.random.key(0), params, config)
    schedule = relora_schedule(
        0.05,
        total_steps=every * restarts,
        restart_every=every,
        warmup_steps=3,
        restart_warmup_steps=3,
    )
    tx = optax.adam(schedule)

    def loss(adapters, params):
        h = x @ params["w"] + jlora.ops.dense_branch(x, adapters["w"])
        return 0.5 * jnp.mean((h - y) ** 2)

    @jax.jit
    def step(adapters, state, params):
        grads = jax.grad(loss)(adapters, params)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state

    losses = [float(loss(adapters, params))]
    with standard_promotion:
        state = tx.init(adapters)
        for k in range(1, restarts + 1):
            for _ in range(every):
                adapters, state = step(adapters, state, params)
            params, adapters = merge_and_reinit(jax.random.key(k), params, adapters, config)
            # A full reset: partial ones diverge here (see reset_optimizer_state's docstring).
            state = reset_optimizer_state(state, 1.0)
            losses.append(float(loss(adapters, params)))
            sv = np.linalg.svd(f64(params["w"]) - f64(w0), compute_uv=False)
            # Each cycle adds rank r: the k r-th singular value is well above round-off, every
            # later one at it (float32 merges of O(1) weights round at ~1e-7).
            assert sv[k * rank - 1] > 1e-3 * sv[0], (k, sv)
            assert np.all(sv[k * rank :] < 1e-6 * sv[0]), (k, sv)
    assert step._cache_size() == 1  # restarts keep shapes: one compilation
    assert losses[-1] < 0.5 * losses[0]


def test_merge_and_reinit_keeps_shardings_and_function():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    rng = np.random.default_rng(2)
    w = jax.device_put(
        jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
        NamedSharding(mesh, P("data", "model")),
    )
    params = {"w": w, "bias": jnp.zeros(16)}
    config = jlora.LoraConfig(targets="w", rank=2)
    adapters = jlora.sharding.init(jax.random.key(0), params, config)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    merged, fresh = merge_and_reinit(jax.random.key(1), params, adapters, config)
    assert merged["w"].sharding == w.sharding
    assert merged["bias"] is params["bias"]
    assert fresh["w"].a.sharding == adapters["w"].a.sharding
    assert fresh["w"].b.sharding == adapters["w"].b.sharding
    np.testing.assert_array_equal(merged["w"], jlora.merge(params, adapters)["w"])
    np.testing.assert_array_equal(fresh["w"].b, np.zeros((2, 16)))  # the function is unchanged
    want_a = jlora.init(jax.random.key(1), merged, config)["w"].a
    np.testing.assert_array_equal(fresh["w"].a, want_a)


def test_merge_and_reinit_errors():
    params = {"w": jnp.ones((4, 3)), "v": jnp.ones((4, 3))}
    adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=1))
    with pytest.raises(jlora.AdapterMismatchError, match=r"^v: config targets other weights"):
        merge_and_reinit(jax.random.key(1), params, adapters, jlora.LoraConfig("w|v", rank=1))
    with pytest.raises(
        jlora.AdapterMismatchError,
        match=r"^w: config makes factors a \(4, 2\), b \(2, 3\), scale 8.0 but",
    ):
        merge_and_reinit(jax.random.key(1), params, adapters, jlora.LoraConfig("w", rank=2))
    with pytest.raises(TypeError, match="merge_and_reinit: key: got a int"):
        merge_and_reinit(0, params, adapters, jlora.LoraConfig(targets="w", rank=1))
