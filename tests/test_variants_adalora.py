"""AdaLoRA: init, regulariser, importance, budget schedule, masking, export, and a pruning run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numerics import EPS32, assert_within_roundoff, f64

import jlora
from jlora.variants import (
    AdaloraFactors,
    adalora_budget,
    adalora_init,
    adalora_mask,
    adalora_orth,
    adalora_ranks,
    adalora_scores,
    adalora_state,
    adalora_to_lora,
    adalora_total_rank,
    adalora_update_importance,
)

# optax mixes int32 step counts with floats, which the strict test promotion refuses.
standard_promotion = jax.numpy_dtype_promotion("standard")


def _params(seed):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.standard_normal((16, 12)), jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((12, 10)), jnp.float32),
        "stacked": jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32),
    }


def _config(rank=4):
    return jlora.LoraConfig(
        ("w1", "w2", "stacked"), rank=rank, alpha=2.0, layouts=(("stacked", "sio"),)
    )


def _random_triplets(ada, seed):
    """``ada`` with random ``p``, ``lam``, ``q`` (distinct values, so scores have no ties)."""
    rng = np.random.default_rng(seed)

    def fill(x):
        return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

    return jax.tree.map(fill, ada)


def test_init_is_exactly_the_base():
    params = _params(0)
    ada = adalora_init(jax.random.key(0), params, _config())
    assert ada["stacked"].p.shape == (3, 8, 4) and ada["stacked"].lam.shape == (3, 4)
    assert ada["stacked"].q.shape == (3, 4, 6)
    assert float(jnp.abs(ada["w1"].p).max()) > 0 and float(jnp.abs(ada["w1"].q).max()) > 0
    merged = jlora.merge(params, adalora_to_lora(ada, drop_masked=False))
    for path in params:
        np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(params[path]))
    ranks = adalora_ranks(ada)
    assert (ranks["w1"], ranks["w2"]) == (0, 0)
    np.testing.assert_array_equal(ranks["stacked"], [0, 0, 0])
    assert adalora_total_rank(ada) == 4 + 4 + 3 * 4


def test_orth_regulariser_against_float64():
    ada = _random_triplets(adalora_init(jax.random.key(1), _params(1), _config()), 2)
    want = 0.0
    for f in ada.values():
        p, q = f64(f.p), f64(f.q)
        eye = np.eye(4)
        want += ((np.swapaxes(p, -1, -2) @ p - eye) ** 2).sum()
        want += ((q @ np.swapaxes(q, -1, -2) - eye) ** 2).sum()
    np.testing.assert_allclose(float(adalora_orth(ada)), want, rtol=1e-5)
    # Orthonormal columns of p and rows of q: the regulariser vanishes.
    q_mat, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((16, 4)))
    f = AdaloraFactors(
        jnp.asarray(q_mat, jnp.float32),
        jnp.zeros(4, jnp.float32),
        jnp.eye(4, 12, dtype=jnp.float32),
        1.0,
        jlora.Layout(1, 1),
    )
    assert float(adalora_orth({"w": f})) < 20 * EPS32


def _numpy_state(ada, grads_seq, beta1, beta2):
    ipt = jax.tree.map(lambda x: np.zeros(x.shape), ada)
    unc = jax.tree.map(lambda x: np.zeros(x.shape), ada)
    for g in grads_seq:
        s = jax.tree.map(lambda w, gg: np.abs(f64(w) * f64(gg)), ada, g)
        ipt = jax.tree.map(lambda i, x: beta1 * i + (1 - beta1) * x, ipt, s)
        unc = jax.tree.map(lambda u, x, i: beta2 * u + (1 - beta2) * np.abs(x - i), unc, s, ipt)
    scores = {}
    for path in ada:
        si = jax.tree.map(np.multiply, ipt[path], unc[path])
        n_stack = si.lam.ndim - 1
        p_mean = si.p.mean(axis=n_stack)
        q_mean = si.q.mean(axis=-1)
        scores[path] = si.lam + p_mean + q_mean
    return scores


def test_importance_and_scores_against_float64():
    params = _params(4)
    ada = _random_triplets(adalora_init(jax.random.key(4), params, _config()), 5)
    grads_seq = [_random_triplets(ada, 10 + k) for k in range(3)]
    state = adalora_state(ada)
    step = jax.jit(lambda s, a, g: adalora_update_importance(s, a, g, beta1=0.8, beta2=0.7))
    for g in grads_seq:
        state = step(state, ada, g)
    want = _numpy_state(ada, grads_seq, 0.8, 0.7)
    got = adalora_scores(state)
    for path in want:
        np.testing.assert_allclose(np.asarray(got[path]), want[path], rtol=1e-5, atol=0)


def _formula(t, b0, bt, ti, tf, total):
    if t < ti:
        return b0
    if t >= total - tf:
        return bt
    return bt + int(np.floor((b0 - bt) * (1 - (t - ti) / (total - tf - ti)) ** 3))


def test_budget_schedule():
    kw = dict(initial=96, target=24, warmup=10, final=20, total=130)
    assert adalora_budget(0, **kw) == adalora_budget(9, **kw) == 96
    assert adalora_budget(10, **kw) == 96  # (1 - 0)^3 = 1 at t_i
    assert adalora_budget(110, **kw) == adalora_budget(129, **kw) == 24
    assert adalora_budget(60, **kw) == 24 + int(72 * 0.5**3) == 33  # the midpoint
    assert adalora_budget(35, **kw) == 24 + int(72 * 0.75**3)
    traced = jax.jit(jax.vmap(lambda s: adalora_budget(s, **kw)))(jnp.arange(130, dtype=jnp.int32))
    for t in range(130):
        want = _formula(t, 96, 24, 10, 20, 130)
        assert adalora_budget(t, **kw) == want, t
        assert int(traced[t]) == want, t  # float32 (1 - x)^3 floors the same on these steps
    with pytest.raises(jlora.ConfigError, match=r"target=100.*expected 0 <= target <= initial"):
        adalora_budget(0, initial=96, target=100, warmup=1, final=1, total=10)
    with pytest.raises(jlora.ConfigError, match=r"warmup \+ final < total"):
        adalora_budget(0, initial=9, target=1, warmup=5, final=5, total=10)


@pytest.mark.parametrize("budget", [0, 1, 7, 19, 20, 40])
def test_mask_keeps_exactly_the_top_scores(budget):
    params = _params(6)
    ada = _random_triplets(adalora_init(jax.random.key(6), params, _config()), 7)
    grads = _random_triplets(ada, 8)
    state = adalora_update_importance(adalora_state(ada), ada, grads)
    masked = jax.jit(adalora_mask)(ada, state, jnp.int32(budget))
    flat = np.concatenate([np.asarray(s).reshape(-1) for s in adalora_scores(state).values()])
    top = set(np.argsort(-flat, kind="stable")[:budget].tolist())
    kept = np.concatenate([np.asarray(f.lam).reshape(-1) != 0 for f in masked.values()])
    assert set(np.flatnonzero(kept).tolist()) == top
    assert sum(int(np.sum(r)) for r in adalora_ranks(masked).values()) == min(budget, 20)
    for path in ada:  # p and q untouched, kept lam unchanged
        np.testing.assert_array_equal(np.asarray(masked[path].p), np.asarray(ada[path].p))
        np.testing.assert_array_equal(np.asarray(masked[path].q), np.asarray(ada[path].q))
        lam, new = np.asarray(ada[path].lam), np.asarray(masked[path].lam)
        np.testing.assert_array_equal(new[new != 0], lam[new != 0])


def test_export_merges_to_p_diag_lam_q():
    params = _params(9)
    ada = _random_triplets(adalora_init(jax.random.key(9), params, _config()), 10)
    lam1 = ada["w1"].lam.at[jnp.array([0, 2])].set(0.0)
    lam_s = ada["stacked"].lam.at[:, 1].set(0.0).at[0, 3].set(0.0)
    ada = {
        **ada,
        "w1": AdaloraFactors(ada["w1"].p, lam1, ada["w1"].q, ada["w1"].scale, ada["w1"].layout),
        "stacked": AdaloraFactors(
            ada["stacked"].p, lam_s, ada["stacked"].q, 0.5, ada["stacked"].layout
        ),
    }
    lora = adalora_to_lora(ada)
    assert (lora["w1"].rank, lora["w2"].rank, lora["stacked"].rank) == (2, 4, 3)
    assert adalora_ranks(ada)["w1"] == 2
    np.testing.assert_array_equal(adalora_ranks(ada)["stacked"], [2, 3, 3])
    for drop in (True, False):
        merged = jlora.merge(params, adalora_to_lora(ada, drop_masked=drop))
        for path, f in ada.items():
            p, lam, q = f64(f.p), f64(f.lam), f64(f.q)
            want = f64(params[path]) + f.scale * (p * lam[..., None, :]) @ q
            magnitude = np.abs(f64(params[path])) + abs(f.scale) * (
                np.abs(p * lam[..., None, :]) @ np.abs(q)
            )
            assert_within_roundoff(merged[path], want, magnitude, terms=4 + 3, err_msg=path)


def test_beta_error():
    ada = adalora_init(jax.random.key(0), _params(0), _config())
    with pytest.raises(jlora.ConfigError, match=r"beta2=1.0 is outside \[0, 1\)"):
        adalora_update_importance(adalora_state(ada), ada, ada, beta2=1.0)


def test_training_prunes_to_the_budget_and_the_loss_falls():
    rng = np.random.default_rng(11)
    params = {k: v for k, v in _params(11).items() if k != "stacked"}
    x = {
        k: jnp.asarray(rng.standard_normal((64, v.shape[0])), jnp.float32)
        for k, v in params.items()
    }
    true_rank = {"w1": 2, "w2": 1}
    target = {
        k: v
        + jnp.asarray(
            rng.standard_normal((v.shape[0], true_rank[k]))
            @ rng.standard_normal((true_rank[k], v.shape[1])),
            jnp.float32,
        )
        for k, v in params.items()
    }
    config = jlora.LoraConfig(["w1", "w2"], rank=4, alpha=4.0)
    ada = adalora_init(jax.random.key(11), params, config)
    total, warmup, final, every = 300, 30, 60, 10
    kw = dict(initial=adalora_total_rank(ada), target=3, warmup=warmup, final=final, total=total)

    def task_loss(ada):
        w = jlora.merge(params, adalora_to_lora(ada, drop_masked=False))
        return sum(jnp.mean(jnp.square(x[k] @ (w[k] - target[k]))) for k in w)

    tx = optax.adam(3e-2)

    @jax.jit
    def step(ada, opt, state):
        loss, grads = jax.value_and_grad(lambda a: task_loss(a) + 0.1 * adalora_orth(a))(ada)
        updates, opt = tx.update(grads, opt, ada)
        state = adalora_update_importance(state, ada, grads)
        return optax.apply_updates(ada, updates), opt, state, loss

    mask = jax.jit(adalora_mask)
    opt, state = tx.init(ada), adalora_state(ada)
    first = float(task_loss(ada))
    budgets = []
    with standard_promotion:
        for t in range(total):
            ada, opt, state, _ = step(ada, opt, state)
            if (warmup <= t < total - final and t % every == 0) or t >= total - final:
                budgets.append(adalora_budget(t, **kw))
                ada = mask(ada, state, budgets[-1])
                assert sum(adalora_ranks(ada).values()) <= budgets[-1]
    assert budgets[0] == 8 and budgets[-1] == 3 and budgets == sorted(budgets, reverse=True)
    ranks = adalora_ranks(ada)
    last = float(task_loss(ada))
    assert sum(ranks.values()) == 3
    assert ranks == true_rank  # the budget went where the target's rank is
    # Fitted to ~0.5% of the start (constant-lr Adam levels off there); rank 3 fits exactly.
    assert last < 1e-2 * first, (first, last)


def test_to_lora_leaves_out_a_weight_that_keeps_no_triplet():
    layout = jlora.Layout(1, 1)
    kept = AdaloraFactors(jnp.ones((3, 2)), jnp.array([0.0, 2.0]), jnp.ones((2, 4)), 1.0, layout)
    gone = AdaloraFactors(jnp.ones((3, 2)), jnp.zeros(2), jnp.ones((2, 4)), 1.0, layout)
    lora = adalora_to_lora({"blocks": {"a": kept, "b": gone}, "c": gone})
    assert list(lora) == ["blocks"] and list(lora["blocks"]) == ["a"]
    assert lora["blocks"]["a"].rank == 1
    params = {"blocks": {"a": jnp.zeros((3, 4)), "b": jnp.zeros((3, 4))}, "c": jnp.zeros((3, 4))}
    merged = jlora.merge(params, lora)
    np.testing.assert_array_equal(merged["blocks"]["b"], params["blocks"]["b"])
    np.testing.assert_array_equal(merged["blocks"]["a"], jnp.full((3, 4), 2.0))
