"""examples/variants.py (issue 16's experiments): its helpers (fast) and its --quick run (slow)."""

import pathlib
import sys

import jax
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import variants  # noqa: E402


def test_numerical_rank_and_captured_energy_against_numpy():
    rng = np.random.default_rng(0)
    low = rng.normal(size=(32, 3)) @ rng.normal(size=(3, 24))
    s = np.linalg.svd(low, compute_uv=False)
    assert variants.numerical_rank(s) == 3
    assert variants.numerical_rank(np.array([1.0, 2e-3, 5e-4])) == 2  # relative to sigma_1
    assert variants.captured(low, low, 3) == pytest.approx(1.0, abs=1e-12)
    full = rng.normal(size=(32, 24))
    u, _, vt = np.linalg.svd(low)
    expected = np.sum((u[:, :2].T @ full @ vt[:2].T) ** 2) / np.sum(full**2)
    assert variants.captured(full, low, 2) == pytest.approx(expected, rel=1e-12)


def test_train_scales_updates_by_lr_like_a_schedule_peaking_at_lr():
    """One compilation serves every lr: updates * lr equal Adam with the lr in its schedule."""
    import jax.numpy as jnp
    import optax

    target = jnp.array([1.0, -2.0, 0.5])
    make = lambda k: target[None, :] + 0.01 * jax.random.normal(k, (8, 3))  # noqa: E731

    def loss(w, _, batch):
        return jnp.mean(jnp.sum((w[None, :] - batch) ** 2, -1))

    with jax.numpy_dtype_promotion("standard"):
        ours, _ = variants.train(
            loss, jnp.zeros(3), None, make, variants.adam_tx(variants.schedule_for(1.0, 100)),
            steps=100, key=jax.random.key(0), lr=0.05, chunk=50, cache="test-lr",
        )  # fmt: skip
        ref, _ = variants.train(
            loss, jnp.zeros(3), None, make, variants.adam_tx(variants.schedule_for(0.05, 100)),
            steps=100, key=jax.random.key(0), chunk=50,
        )  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(target), atol=0.1)
    assert isinstance(optax.adam(1.0), optax.GradientTransformation)


@pytest.mark.slow
def test_variants_quick_run(tmp_path):
    """The qualitative claims of docs/experiments.md's issue-16 section, at the --quick scale.

    Margins, not numbers: XLA's CPU code differs between processors, so no value is pinned.
    """
    with jax.numpy_dtype_promotion("standard"):
        out = variants.main(["--quick", "--figures", str(tmp_path)])
    assert (tmp_path / "relora_spectrum.png").stat().st_size > 0
    d_model, r = 64, 4
    dec = out["decoder"]
    lora = dec[f"LoRA r={r}"]["count"]
    assert lora == 4 * 2 * d_model * r  # 2 layers x {q, v} x (a + b)
    equal = (f"rsLoRA r={r}", f"PiSSA r={r}", f"OLoRA r={r}", "LoRA-FA r=8/8/8/8 (equal params)")
    for name in equal:
        assert dec[name]["count"] == lora, name
    assert dec[f"LoRA-FA r={r} (equal rank)"]["count"] == lora // 2
    assert dec[f"DoRA r={r - 1}"]["count"] < lora < dec[f"DoRA r={r}"]["count"]
    assert dec[f"DoRA r={r}"]["count"] == lora + 4 * d_model  # one magnitude per output unit
    ada = dec["AdaLoRA 6 -> 4 per weight"]
    for info in ada["infos"]:  # the budget is met exactly: LoRA's count plus one lambda a triplet
        assert sum(info["ranks"].values()) == 4 * r
        assert info["final_count"] == lora + 4 * r
    base_loss = out["decoder_base"]["loss"]
    for name, res in dec.items():  # every method learned something on every seed
        assert all(run["loss"] < 0.8 * base_loss for run in res["runs"]), name
    dig = out["digits"]
    assert out["digits_base"]["score"] < 0.05  # a head trained on 0-4 never says 5-9
    for name, res in dig.items():  # chance among 5-9 is 0.2
        assert all(run["score"] > 0.3 for run in res["runs"]), name
        assert all(run["loss"] < 0.25 * out["digits_base"]["loss"] for run in res["runs"]), name
    for info in dig["AdaLoRA 3 -> 2 per weight"]["infos"]:
        assert sum(info["ranks"].values()) == 4
    galore = out["galore"]
    adam = galore["Adam"]
    assert all(run["score"] > 0.85 for run in adam["runs"])
    ratios = [galore[f"GaLore r={k}"]["state_bytes"] / adam["state_bytes"] for k in (8, 32)]
    assert ratios[0] < ratios[1] < 0.5
    for k in (8, 32):
        assert all(run["score"] > 0.5 for run in galore[f"GaLore r={k}"]["runs"])
    relora = out["relora"]
    for snapshots in relora["relora"]:  # the total update's rank grows by r per segment
        for k, snap in enumerate(snapshots):
            for path, update in snap.items():
                s = np.linalg.svd(update, compute_uv=False)
                assert variants.numerical_rank(s) == (k + 1) * r, (k, path)
    for name, cap in (("lora", r), ("full", 4 * r)):
        for snap in relora[name]:
            for path, update in snap.items():
                rank = variants.numerical_rank(np.linalg.svd(update, compute_uv=False))
                assert (rank == r) if name == "lora" else (rank > cap), (name, path)
