"""GaLore: refresh cadence, the full-rank SGD identity, Adam in the projected space, state memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numerics import EPS32, abs_chain, assert_within_roundoff, f64

from jlora.variants import GaloreState, galore, state_bytes

# optax mixes int32 step counts with floats, which the strict test promotion refuses.
standard_promotion = jax.numpy_dtype_promotion("standard")


def _params(rng):
    return {
        "wide": jnp.asarray(rng.standard_normal((6, 20)), jnp.float32),  # left projection
        "tall": jnp.asarray(rng.standard_normal((16, 5)), jnp.float32),  # right projection
        "bias": jnp.asarray(rng.standard_normal(5), jnp.float32),  # passes through
    }


def _grads(params, rng):
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)


def _run(tx, params, steps, seed):
    rng = np.random.default_rng(seed)
    grads = [_grads(params, rng) for _ in range(steps)]
    update = jax.jit(tx.update)
    out = []
    with standard_promotion:
        state = tx.init(params)
        for g in grads:
            updates, state = update(g, state, params)
            out.append((g, updates, state))
    return out


def test_projectors_refresh_exactly_every_T_steps():
    rng = np.random.default_rng(0)
    params = _params(rng)
    trace = _run(galore(optax.sgd(0.1), rank=2, update_proj_gap=3), params, steps=8, seed=1)
    for t, (g, _, state) in enumerate(trace):
        for name, side in (("wide", "left"), ("tall", "right")):
            p = f64(state.projectors[name])
            if t % 3 == 0:
                # Refreshed from this step's gradient: the top-2 singular subspace of its side.
                u, _, vt = np.linalg.svd(f64(g[name]))
                want = u[:, :2] if side == "left" else vt[:2].T
                np.testing.assert_allclose(p @ p.T, want @ want.T, atol=1e-5)
                if t > 0:
                    assert not np.array_equal(p, f64(trace[t - 1][2].projectors[name]))
            else:
                np.testing.assert_array_equal(p, f64(trace[t - 1][2].projectors[name]))
        assert int(state.count) == t + 1


def test_full_rank_with_sgd_is_sgd():
    rng = np.random.default_rng(2)
    params = _params(rng)
    lr, scale = 0.1, 0.5
    tx = galore(optax.sgd(lr), rank=100, update_proj_gap=2, scale=scale)
    for g, updates, state in _run(tx, params, steps=4, seed=3):
        # Rank clamps to min(m, n): the projector is orthogonal and P P^T G = G to round-off.
        assert state.projectors["wide"].shape == (6, 6)
        assert state.projectors["tall"].shape == (5, 5)
        for name in ("wide", "tall"):
            p = state.projectors[name]
            pp = abs_chain(p, p.T)  # |P| |P^T|, on the left (wide) or right (tall) of |G|
            grad = np.abs(f64(g[name]))
            magnitude = pp @ grad if name == "wide" else grad @ pp
            k = p.shape[0]
            assert_within_roundoff(
                updates[name],
                -lr * scale * f64(g[name]),
                lr * scale * magnitude,
                terms=2 * k + 3,
                err_msg=name,
            )
        # Other leaves go to the inner optimizer in full, unscaled.
        np.testing.assert_array_equal(updates["bias"], -lr * g["bias"])


def test_adam_runs_in_the_projected_space():
    """Against float64 Adam on R_t = P^T G_t (P taken from the state: its sign is arbitrary)."""
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.standard_normal((8, 24)), jnp.float32)}
    lr, scale, b1, b2, eps = 1e-2, 0.25, 0.9, 0.999, 1e-8
    trace = _run(galore(optax.adam(lr), rank=3, update_proj_gap=100), params, steps=4, seed=5)
    p = f64(trace[0][2].projectors["w"])
    mu = nu = np.zeros((3, 24))
    for t, (g, updates, state) in enumerate(trace, start=1):
        np.testing.assert_array_equal(f64(state.projectors["w"]), p)  # no refresh before T
        r = p.T @ f64(g["w"])
        mu, nu = b1 * mu + (1 - b1) * r, b2 * nu + (1 - b2) * r**2
        u = -lr * (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
        want = scale * p @ u
        # Adam's update is ~lr per element; 1e-3 lr allows for its amplification of round-off.
        bound = 1e-3 * lr * scale * np.abs(p) @ np.ones_like(u) + 8 * 8 * EPS32 * np.abs(want)
        assert np.all(np.abs(f64(updates["w"]) - want) <= bound), t
        assert state.inner_state[0].mu["w"].shape == (3, 24)


@pytest.mark.parametrize("rank", [4, 8, 15])
def test_state_memory_below_adams(rank):
    params = {
        "attn": jnp.zeros((64, 64)),
        "mlp": jnp.zeros((64, 256)),
        "out": jnp.zeros((256, 64)),
        "bias": jnp.zeros(64),
    }
    with standard_promotion:
        adam = state_bytes(optax.adam(1e-3).init(params))
        ours = state_bytes(galore(optax.adam(1e-3), rank=rank).init(params))
    assert isinstance(galore(optax.adam(1e-3), rank=rank).init(params), GaloreState)
    # Per (m, n) leaf: a projector r min(m, n) plus two moments r max(m, n), against 2 m n.
    matrices = [(64, 64), (64, 256), (256, 64)]
    want = sum(rank * min(s) + 2 * rank * max(s) for s in matrices) * 4
    want += 2 * 64 * 4 + 4 + 4  # the bias's moments, Adam's count, GaLore's count
    assert ours == want
    assert adam == sum(2 * m * n * 4 for m, n in matrices) + 2 * 64 * 4 + 4
    assert ours < adam  # r < n / 2 for every leaf here
    print(f"rank {rank}: GaLore state {ours} bytes, Adam {adam} bytes ({ours / adam:.2f}x)")


def test_errors():
    with pytest.raises(TypeError, match="galore: inner is the function optax"):
        galore(optax.adam, rank=2)
    with pytest.raises(ValueError, match="galore: rank: 0 is invalid"):
        galore(optax.sgd(1.0), rank=0)
    with pytest.raises(ValueError, match=r"galore: update_proj_gap: 1.5 is invalid"):
        galore(optax.sgd(1.0), rank=2, update_proj_gap=1.5)
    with pytest.raises(ValueError, match="galore: scale=0 is invalid"):
        galore(optax.sgd(1.0), rank=2, scale=0)
    tx = galore(optax.sgd(1.0), rank=2)
    state = tx.init({"w": jnp.zeros((4, 6))})
    with pytest.raises(ValueError, match=r"galore: w: the gradient has shape \(5, 6\) but"):
        tx.update({"w": jnp.zeros((5, 6))}, state)


def test_trains_a_least_squares_problem():
    """Full-rank training of a pytree: the loss falls well below its start."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = x @ jnp.asarray(rng.standard_normal((16, 12)), jnp.float32)  # a full-rank solution
    params = {"w": jnp.zeros((16, 12)), "b": jnp.zeros(12)}

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"][None] - y) ** 2)

    tx = galore(optax.adam(0.1), rank=2, update_proj_gap=5, scale=1.0)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    with standard_promotion:
        state = tx.init(params)
        start = float(loss(params))
        for _ in range(150):
            params, state = step(params, state)
    # Rank-2 projections refreshed every 5 steps reach beyond rank 2 (the least-squares
    # solution has rank 12).
    assert float(loss(params)) < 0.3 * start
    assert np.linalg.matrix_rank(f64(params["w"]), tol=1e-3) > 2
