"""PiSSA / OLoRA initialisations (residual + merged = W0), their export as LoRA over the original
base, and LoRA-FA (a frozen)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numerics import EPS32, assert_within_roundoff, delta_reference, f64

import jlora
from jlora.variants import lora_fa, olora_init, pissa_init, residual_to_lora


def _params(seed):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)},
        "stack": jnp.asarray(rng.standard_normal((3, 10, 6)), jnp.float32),  # scanned "sio"
        "gpt2": jnp.asarray(rng.standard_normal((7, 9)), jnp.float32),  # (out, in): "oi"
        "bias": jnp.zeros(8),
    }


CONFIG = jlora.LoraConfig(
    targets=("dense/kernel", "stack", "gpt2"),
    rank=3,
    alpha=6.0,
    layouts={"stack": "sio", "gpt2": "oi"},
)


@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_residual_plus_merged_is_the_base(init):
    params = _params(0)
    residual, adapters = init(params, CONFIG)
    assert residual["bias"] is params["bias"]
    merged = jlora.merge(residual, adapters)
    for path, w in (
        ("dense/kernel", params["dense"]["kernel"]),
        ("stack", params["stack"]),
        ("gpt2", params["gpt2"]),
    ):
        f = _at(adapters, path)
        got = _at(merged, path)
        # residual = W - d, then + d, each d a rank-long float32 sum: magnitude |W| + 2 |a||b|.
        d_abs = np.abs(
            f64(
                jlora.delta(
                    {"x": jlora.LoraFactors(jnp.abs(f.a), jnp.abs(f.b), abs(f.scale), f.layout)}
                )["x"]
            )
        )
        magnitude = np.abs(f64(w)) + 2 * d_abs
        assert_within_roundoff(got, f64(w), magnitude, terms=f.rank + 4, err_msg=path)


def _at(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def test_pissa_factors_are_the_principal_part():
    params = _params(1)
    config = jlora.LoraConfig(targets="dense/kernel", rank=3, alpha=3.0)  # scale 1
    residual, adapters = pissa_init(params, config)
    w = f64(params["dense"]["kernel"])
    u, s, vt = np.linalg.svd(w)
    f = adapters["dense"]["kernel"]
    np.testing.assert_allclose(
        delta_reference(f), (u[:, :3] * s[:3]) @ vt[:3], atol=64 * EPS32 * s[0]
    )
    # a = U_r S_r^1/2 and b = S_r^1/2 V_r^T share the singular values: a^T a = b b^T = S_r.
    np.testing.assert_allclose(f64(f.a).T @ f64(f.a), np.diag(s[:3]), atol=64 * EPS32 * s[0])
    np.testing.assert_allclose(f64(f.b) @ f64(f.b).T, np.diag(s[:3]), atol=64 * EPS32 * s[0])
    # With scale 1 the residual is the minor part: its top singular value is W's fourth.
    top = np.linalg.svd(f64(residual["dense"]["kernel"]), compute_uv=False)[0]
    assert top == pytest.approx(s[3], rel=1e-5)


def test_olora_b_has_orthonormal_rows():
    params = _params(2)
    _, adapters = olora_init(params, CONFIG)
    for path in ("dense/kernel", "gpt2"):
        b = f64(_at(adapters, path).b)
        np.testing.assert_allclose(b @ b.T, np.eye(3), atol=32 * EPS32, err_msg=path)
    b = f64(adapters["stack"].b)  # one orthonormal b per stacked layer
    np.testing.assert_allclose(
        b @ np.swapaxes(b, -1, -2), np.broadcast_to(np.eye(3), (3, 3, 3)), atol=32 * EPS32
    )


def test_lora_fa_freezes_a():
    params = _params(3)
    adapters = jlora.init(jax.random.key(0), params, CONFIG)
    tx = lora_fa(optax.adam(1e-2))
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(adapters)
        start = adapters
        for seed in range(3):
            rng = np.random.default_rng(seed)
            grads = jax.tree.map(
                lambda x, rng=rng: jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapters
            )
            updates, state = tx.update(grads, state, adapters)
            adapters = optax.apply_updates(adapters, updates)
    for f, f0 in zip(
        jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, jlora.LoraFactors)),
        jax.tree.leaves(start, is_leaf=lambda x: isinstance(x, jlora.LoraFactors)),
        strict=True,
    ):
        np.testing.assert_array_equal(f.a, f0.a)
        assert float(jnp.abs(f.b).max()) > 0
    # The state holds moments for b only: a's slots are masked out.
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) >= 2]
    b_shapes = sorted(
        tuple(f.b.shape)
        for f in jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, jlora.LoraFactors))
    )
    assert sorted(tuple(x.shape) for x in moments) == sorted(b_shapes * 2)


def test_lora_fa_error():
    with pytest.raises(TypeError, match=r"expected an optax.GradientTransformation"):
        lora_fa(optax.adam)


def _delta(f, absolute=False):
    """``scale a b`` (or ``|scale| |a| |b|``) in float64, in the weight's own axis order."""
    d = delta_reference(f, absolute=absolute)  # factor order (*stack, *fan_in, *fan_out)
    return np.transpose(d, f.layout.from_factor_order(d.ndim)) if f.layout.order else d


def _trained(adapters, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + 0.3 * jnp.asarray(rng.standard_normal(v.shape)), adapters)


@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_residual_to_lora_merges_onto_the_original_base_as_residual_plus_delta(init):
    params = _params(5)
    residual, initial = init(params, CONFIG)
    trained = _trained(initial, 6)
    lora, lora_config = residual_to_lora(initial, trained, CONFIG)
    got = jlora.merge(params, lora)
    for path in ("dense/kernel", "stack", "gpt2"):
        keys = path.split("/")
        pick = lambda t: t[keys[0]][keys[1]] if len(keys) == 2 else t[keys[0]]  # noqa: E731
        f, f0, g = pick(trained), pick(initial), pick(lora)
        assert g.rank == 2 * f.rank and g.scale == f.scale == lora_config.scale_for(path)
        want = f64(pick(residual)) + _delta(f)
        # The residual was W - s a0 b0 rounded once to float32; here W + s (a b - a0 b0) is
        # formed in float32 from W: both within a few roundings of |W| + |s a0 b0| + |s a b|.
        magnitude = np.abs(f64(pick(params))) + _delta(f0, absolute=True) + _delta(f, True)
        assert_within_roundoff(pick(got), want, magnitude, terms=2 * f.rank + 4, err_msg=path)
    np.testing.assert_array_equal(got["bias"], params["bias"])


def test_residual_to_lora_exports_to_peft_and_back(tmp_path):
    import jlora.peft

    params = {"mlp": {"up": {"kernel": _params(7)["dense"]["kernel"]}}}
    config = jlora.LoraConfig(targets=".*kernel", rank=2, alpha=3.0, use_rslora=True)
    residual, initial = pissa_init(params, config)
    lora, lora_config = residual_to_lora(initial, _trained(initial, 8), config)
    jlora.peft.save(tmp_path, lora, lora_config)
    loaded, loaded_config = jlora.peft.load(tmp_path, params)
    assert loaded["mlp"]["up"]["kernel"].rank == 4
    assert loaded_config.scale_for("mlp/up/kernel") == lora["mlp"]["up"]["kernel"].scale
    np.testing.assert_array_equal(jlora.merge(params, loaded)["mlp"]["up"]["kernel"],
                                  jlora.merge(params, lora)["mlp"]["up"]["kernel"])  # fmt: skip


def test_residual_to_lora_errors():
    params = _params(9)
    _, initial = pissa_init(params, CONFIG)
    with pytest.raises(jlora.AdapterMismatchError, match=r"initial adapters cover"):
        residual_to_lora(initial, {"gpt2": initial["gpt2"]}, CONFIG)
    other = dict(initial, gpt2=jlora.LoraFactors(initial["gpt2"].a, initial["gpt2"].b, 1.0,
                                                 initial["gpt2"].layout))  # fmt: skip
    with pytest.raises(jlora.AdapterMismatchError, match=r"gpt2: residual_to_lora: .* differ"):
        residual_to_lora(initial, other, CONFIG)
