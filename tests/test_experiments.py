"""The experiment scripts in examples/: their helpers (fast) and their --quick runs (slow)."""

import pathlib
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora.analysis as an

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import decoder_tasks as dt  # noqa: E402
import rank_ablation  # noqa: E402

SUBSPACES = runpy.run_path(str(EXAMPLES / "subspaces.py"), run_name="subspaces")
LOWRANK = runpy.run_path(str(EXAMPLES / "lowrank_layers.py"), run_name="lowrank_layers")
BUDGET = runpy.run_path(str(EXAMPLES / "budget_ablation.py"), run_name="budget_ablation")
DYNAMICS = runpy.run_path(str(EXAMPLES / "update_dynamics.py"), run_name="update_dynamics")
SPEC = dt.Spec(symbols=5, length=4, d_model=8, heads=2, layers=1)


@pytest.mark.parametrize("task", list(dt.TASKS))
def test_batches_are_task_x_sep_answer(task):
    tokens = np.asarray(dt.make_batch(jax.random.key(0), SPEC, task, 64))
    n = SPEC.length
    assert tokens.shape == (64, SPEC.seq) == (64, 2 * n + 2)
    assert (tokens[:, 0] == SPEC.task_token(task)).all() and (tokens[:, n + 1] == SPEC.sep).all()
    x, y = tokens[:, 1 : n + 1], tokens[:, n + 2 :]
    assert ((x >= 0) & (x < SPEC.symbols)).all()
    np.testing.assert_array_equal(y, x if task == "copy" else x[:, ::-1])
    assert len({SPEC.task_token(t) for t in dt.TASKS} | {SPEC.sep}) == SPEC.vocab - SPEC.symbols


def test_answer_scores_and_loss_read_only_the_answer():
    rng = np.random.default_rng(0)
    tokens = np.asarray(dt.make_batch(jax.random.key(1), SPEC, "reverse", 3))
    logits = rng.normal(size=(3, SPEC.seq, SPEC.vocab)).astype(np.float32)
    n = SPEC.length
    answer = tokens[:, n + 2 :]
    positions = np.arange(n + 1, 2 * n + 1)  # [sep], y_1 .. y_{n-1} predict y_1 .. y_n
    logits[:, positions, :] = -5.0
    for b in range(3):
        logits[b, positions, answer[b]] = 5.0
    logits[0, positions[2], (answer[0, 2] + 1) % SPEC.symbols] = 9.0  # one wrong token
    logits[:, : n + 1] = 100.0 * rng.normal(size=(3, n + 1, SPEC.vocab))  # x half: ignored
    accuracy, exact = dt.answer_scores(jnp.asarray(logits), jnp.asarray(tokens), SPEC)
    assert accuracy == pytest.approx(1 - 1 / (3 * n)) and exact == pytest.approx(2 / 3)
    z = logits[:, positions].astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, answer[..., None], -1).mean()
    loss = dt.answer_loss(jnp.asarray(logits), jnp.asarray(tokens), SPEC)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_fit_minimises_a_quadratic_on_fresh_batches():
    target = jnp.array([1.0, -2.0, 0.5])

    def loss(w, scale, batch):
        return scale * jnp.mean(jnp.sum((w[None, :] - batch) ** 2, -1))

    make = lambda k: target[None, :] + 0.01 * jax.random.normal(k, (8, 3))  # noqa: E731
    seen = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam under the strict test config
        w = dt.fit(
            loss, jnp.zeros(3), jnp.float32(2.0), make, steps=400, lr=0.1,
            key=jax.random.key(0), chunk=100, on_chunk=lambda step, _: seen.append(step),
        )  # fmt: skip
    assert seen == [100, 200, 300, 400]
    np.testing.assert_allclose(np.asarray(w), np.asarray(target), atol=0.02)
    with pytest.raises(ValueError, match="steps=250 must be a positive multiple of chunk=100"):
        dt.fit(loss, w, jnp.float32(1.0), make, steps=250, lr=0.1, key=jax.random.key(0))


def test_fit_many_takes_the_steps_of_fit_for_each_member():
    target = jnp.array([1.0, -2.0, 0.5])

    def loss(w, scale, batch):
        return scale * jnp.mean(jnp.sum((w[None, :] - batch) ** 2, -1))

    make = lambda k: target[None, :] + 0.1 * jax.random.normal(k, (8, 3))  # noqa: E731
    lrs, seeds = (0.01, 0.05), (3, 4)
    with jax.numpy_dtype_promotion("standard"):
        many = dt.fit_many(
            loss, jnp.zeros((2, 3)), jnp.float32(2.0), make, steps=40, chunk=20,
            lrs=jnp.array(lrs), keys=jnp.stack([jax.random.key(s) for s in seeds]),
        )  # fmt: skip
        one = dt.fit(loss, jnp.zeros(3), jnp.float32(2.0), make, steps=40, chunk=20,
                     lr=lrs[1], key=jax.random.key(seeds[1]))  # fmt: skip
    # Same batches and steps; only the order of the lr multiplication differs.
    np.testing.assert_allclose(np.asarray(many[1]), np.asarray(one), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(many[0]), np.asarray(many[1]), atol=1e-3)
    with pytest.raises(ValueError, match="steps=30 must be a positive multiple of chunk=20"):
        dt.fit_many(loss, jnp.zeros((2, 3)), jnp.float32(1.0), make, steps=30, chunk=20,
                    lrs=jnp.array(lrs), keys=jnp.stack([jax.random.key(0)] * 2))  # fmt: skip


def test_budget_ranks_keep_the_budget_and_matched_steps():
    for config in BUDGET["CONFIGS"]:
        rank, types = BUDGET["rank_of"](config), len(config.split(","))
        assert an.lora_param_count(2 * types, 128, rank) == 4096  # 2 layers, d_model 128
        # The matched step: (alpha / r) * lr is the same for every configuration.
        assert BUDGET["ALPHA"] / rank * BUDGET["matched_lr"](config) == pytest.approx(0.01)
        assert BUDGET["matched_lr"](config) in BUDGET["LRS"]
    assert [BUDGET["rank_of"](c) for c in ("q", "q,v", "q,k,v,o")] == [8, 4, 2]


def test_best_lr_is_chosen_on_validation_not_test():
    runs = [{"lr": 1e-2, "accuracy": 0.9, "val_accuracy": 0.5},
            {"lr": 5e-3, "accuracy": 0.1, "val_accuracy": 0.6}] * 2  # fmt: skip
    assert BUDGET["best_lr"]({"q": runs}, "q") == 5e-3
    assert len(BUDGET["select"]({"q": runs}, "q", 1e-2)) == 2


def test_update_measures_match_numpy():
    rng = np.random.default_rng(5)
    n, rank = 16, 3
    w = rng.normal(size=(n, n))
    u = np.linalg.qr(rng.normal(size=(n, rank)))[0]
    v = np.linalg.qr(rng.normal(size=(n, rank)))[0]
    sigma = np.array([3.0, 2.0, 1.0])
    m = DYNAMICS["measure"](w, u @ np.diag(sigma) @ v.T, rank)
    np.testing.assert_allclose(m["sigma"], sigma, rtol=1e-12)
    assert m["top1"] == pytest.approx(9 / 14, rel=1e-12)
    assert m["top4"] == pytest.approx(1.0, rel=1e-12)  # a rank-3 update has it all in 3
    assert m["stable_rank"] == pytest.approx(14 / 9, rel=1e-12)
    uw = np.linalg.svd(w)[0]
    grid = m["grid"]
    assert grid.shape == (rank, n) and grid[:, -1] == pytest.approx(1.0)  # all of R^n
    assert grid[0, 0] == pytest.approx(float(u[:, 0] @ uw[:, 0]) ** 2, abs=1e-10)
    assert m["top_dirs"].shape == (n, rank)
    projected = np.linalg.norm(u.T @ w @ v)
    assert m["amplification"] == pytest.approx(np.linalg.norm(sigma) / projected, rel=1e-6)
    matrix = DYNAMICS["seed_matrix"]([m, DYNAMICS["measure"](w, u @ v.T, rank)])
    np.testing.assert_allclose(matrix, np.ones((2, 2)), atol=1e-10)  # one span, two spectra


def test_host_delta_equals_jlora_delta():
    import jlora

    rng = np.random.default_rng(6)
    a = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    tree = {"layers_0": {"query": {"kernel": jlora.LoraFactors(a, b, 4.0, jlora.Layout(1, 1))}}}
    expected = np.asarray(jlora.delta(tree)["layers_0"]["query"]["kernel"], np.float64)
    reference = 4.0 * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(DYNAMICS["_delta"](tree, 0, "query"), reference, rtol=1e-12)
    np.testing.assert_allclose(expected, reference, rtol=1e-5, atol=1e-5)


def test_torch_init_has_pytorch_bounds_and_a_third_of_the_variance():
    key = jax.random.key(0)
    kernel = np.asarray(LOWRANK["torch_kernel"]()(key, (256, 512)), np.float64)
    assert np.abs(kernel).max() <= 1 / 16 and np.abs(kernel).max() > 0.99 / 16
    assert kernel.var() == pytest.approx(1 / (3 * 256), rel=0.02)
    bias = np.asarray(LOWRANK["torch_bias"](64)(key, (4096,)), np.float64)
    assert np.abs(bias).max() <= 1 / 8 and bias.var() == pytest.approx(1 / (3 * 64), rel=0.1)
    # The stacked layers: a ~ U(+-1/sqrt(n)), b and the bias ~ U(+-1/sqrt(r)), so y = x a b has
    # variance r |x|^2 / (3 n) / (3 r) = |x|^2 / (9 n): a third of one layer's |x|^2 / (3 n).
    n, r = 64, 8
    params = LOWRANK["TorchLowRank"](128, r).init(key, jnp.zeros((1, n)))["params"]
    a, b, bias = (np.asarray(params[k], np.float64) for k in ("a", "b", "bias"))
    assert a.shape == (n, r) and b.shape == (r, 128) and bias.shape == (128,)
    assert np.abs(a).max() <= 1 / 8 and np.abs(b).max() <= 1 / np.sqrt(8)
    assert np.abs(bias).max() <= 1 / np.sqrt(8)
    assert a.var() == pytest.approx(1 / (3 * n), rel=0.2)
    assert b.var() == pytest.approx(1 / (3 * r), rel=0.2)


def test_random_phi_is_the_mean_phi_of_random_subspaces():
    rng = np.random.default_rng(0)
    n, i, j = 20, 3, 7
    draws = [
        an.subspace_similarity(
            np.linalg.qr(rng.normal(size=(n, i)))[0], np.linalg.qr(rng.normal(size=(n, j)))[0]
        )
        for _ in range(2000)
    ]
    stderr = np.std(draws) / np.sqrt(len(draws))
    assert np.mean(draws) == pytest.approx(SUBSPACES["random_phi"](i, j, n), abs=4 * stderr)
    assert SUBSPACES["random_phi"](j, i, n) == 7 / 20


def test_random_projection_closed_form_matches_independent_draws():
    rng = np.random.default_rng(1)
    d, k, r = 24, 16, 3
    w = rng.normal(size=(d, k))
    squares = []
    for _ in range(3000):
        u = np.linalg.qr(rng.normal(size=(d, r)))[0]
        v = np.linalg.qr(rng.normal(size=(k, r)))[0]
        squares.append(np.linalg.norm(u.T @ w @ v) ** 2)
    stderr = np.std(squares) / np.sqrt(len(squares))
    expected = SUBSPACES["random_projection_rms"](w, r) ** 2
    assert expected == pytest.approx(r**2 * np.sum(w**2) / (d * k), rel=1e-12)
    assert np.mean(squares) == pytest.approx(expected, abs=4 * stderr)


def test_chance_levels_come_from_independent_pairs():
    chance = SUBSPACES["chance_levels"](128, draws=60, seed=3)
    assert set(chance) == {"(1,1)", "(8,8)", "(64,64)", "grassmann8"}
    assert all(v.shape == (60,) for v in chance.values())
    # Two halves of one orthonormal matrix would be orthogonal: sqrt(8) pi / 2 = 4.44 apart.
    # Independent 8-dim subspaces of R^128 are about 3.86 apart.
    assert chance["grassmann8"].mean() == pytest.approx(3.86, abs=0.05)
    assert chance["grassmann8"].max() < np.sqrt(8) * np.pi / 2 - 0.3
    for cell, (i, j) in (("(1,1)", (1, 1)), ("(8,8)", (8, 8)), ("(64,64)", (64, 64))):
        stderr = chance[cell].std() / np.sqrt(60)
        assert chance[cell].mean() == pytest.approx(
            SUBSPACES["random_phi"](i, j, 128), abs=5 * stderr
        )


def test_interval_is_the_t_interval_of_the_mean():
    mean, lo, hi = rank_ablation.interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / np.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n), sd = 1
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-9)
    assert rank_ablation.interval([0.5]) == (0.5, 0.5, 0.5)
    assert LOWRANK["interval"]([1.0, 2.0, 3.0]) == pytest.approx((mean, lo, hi), rel=1e-12)


def test_markdown_table_formats_numbers_and_seed_spreads():
    table = rank_ablation.markdown_table(["a", "b", "c"], [["x", 12345, 0.12345]])
    assert table == "| a | b | c |\n| --- | --- | --- |\n| x | 12,345 | 0.123 |"
    runs = [{"accuracy": 0.5, "exact": 0.0}, {"accuracy": 1.0, "exact": 1.0}]
    # t_{0.975, 1} = 12.7: the interval of two seeds is wide, and clipped to [0, 1].
    assert rank_ablation._spread(runs, "accuracy") == "0.750 [0.00, 1.00] (0.50-1.00)"
    assert rank_ablation._spread(runs[:1], "accuracy") == "0.500"
    assert rank_ablation.solved(runs) == "1/2"


def test_epochs_spread_counts_seeds_that_never_reach_the_level():
    curves = np.array([[0.1, 0.96, 0.97], [0.1, 0.5, 0.96], [0.1, 0.2, 0.3]])
    assert LOWRANK["_epochs_spread"](curves, 0.95) == "2 (1-never)"
    assert LOWRANK["_epochs_spread"](curves[:2], 0.95) == "1.5 (1-2)"
    assert LOWRANK["_epochs_spread"](curves, 0.97) == "> 2 (1/3 seeds reach it)"


def test_hidden_params_counts_the_models_own_params():
    x = jnp.ones((1, 64))
    for rank in (None, 1, 8):
        params = jax.eval_shape(LOWRANK["MLP"](rank).init, jax.random.key(0), x)["params"]
        hidden = sum(
            leaf.size for k in ("hidden_0", "hidden_1") for leaf in jax.tree.leaves(params[k])
        )
        assert LOWRANK["hidden_params"](rank) == hidden


def test_epochs_to():
    curve = np.array([0.1, 0.5, 0.96, 0.94, 0.98])
    assert LOWRANK["epochs_to"](curve, 0.95) == 2
    assert LOWRANK["epochs_to"](curve, 0.97) == 4
    assert LOWRANK["epochs_to"](curve, 0.99) is None
    assert LOWRANK["epochs_to"](curve, 0.1) == 0


@pytest.mark.slow
def test_subspaces_quick_run(tmp_path, capsys):
    """The qualitative claims of docs/experiments.md sections 2 and 3, at the --quick scale.

    Tolerances, not numbers: XLA's CPU code differs between processors, so no value is pinned.
    """
    with jax.numpy_dtype_promotion("standard"):
        out = SUBSPACES["main"](["--quick", "--figures", str(tmp_path)])
    assert out["copy"]["accuracy"] > 0.99  # the base learned its pretraining task
    ablation = out["ablation"]
    base = ablation["base", 0]
    assert base["accuracy"] < 0.2  # reversing is new to it
    for rank in (4, 8, 64):
        lora = ablation["q,v", rank]
        assert len(lora["runs"]) == 2
        assert lora["accuracy"] > base["accuracy"] + 0.25 and lora["loss"] < base["loss"] / 2
        assert lora["trainable"] == 2 * 2 * 2 * 128 * rank  # 2 layers x {q, v} x (a + b)
    sub = out["subspaces"]
    chance = sub["chance"]
    # Chance from independent pairs: about 3.86 apart, not the maximum 4.44.
    assert 3.8 < chance["grassmann8"].mean() < 3.92
    low_grassmann, high_phi8 = (
        np.quantile(chance["grassmann8"], 0.025),
        np.quantile(chance["(8,8)"], 0.975),
    )
    for layer, name in ((0, "query"), (0, "value"), (1, "query"), (1, "value")):
        for side in ("input", "output"):
            grids = sub[layer, name, side]
            for g in (*grids["r8_r64"].values(), *grids["seeds"].values()):
                assert np.all((g >= -1e-12) & (g <= 1 + 1e-12))
            assert grids["r8_r64"][0].shape == (8, 64) and grids["seeds"][0, 1].shape == (64, 64)
            # Two seeds' top-8 directions overlap above chance, and their spans are closer
            # than 97.5% of random pairs.
            assert grids["seeds"][0, 1][7, 7] > high_phi8, (layer, name, side)
            assert grids["grassmann8"][0, 1] < low_grassmann, (layer, name, side)
        weight = np.asarray(out["params"][f"layers_{layer}"][name]["kernel"], np.float64)
        for p in sub[layer, name, 4]:
            # The r = 4 update's directions are not W's top directions (the paper's Table 7):
            # at full scale every seed projects W at most 0.45 as much as W's own directions.
            assert p.onto_delta < 0.6 * p.onto_weight
        random = SUBSPACES["random_projection_rms"](weight, 4)
        assert random < np.mean([p.onto_weight for p in sub[layer, name, 4]]) / 5
        # Amplification: large at r = 4, small at r = 64.
        amplification = {
            r: np.mean([p.amplification for p in sub[layer, name, r]]) for r in (4, 64)
        }
        assert amplification[4] > 2 * amplification[64], (layer, name, amplification)
    written = {p.name for p in tmp_path.iterdir()}
    kinds = ("r8_r64", "seeds", "zoom", "seed_matrix")
    assert written == {f"phi_{k}_{n}.png" for k in kinds for n in ("query", "value")} | {
        "phi_random.png"
    }
    printed = capsys.readouterr().out
    assert "| LoRA {q,v} | 64 | 65,536 |" in printed and "grassmann8 3.8" in printed


@pytest.mark.slow
def test_lowrank_layers_quick_run(tmp_path):
    """Section 1's claims that hold at the --quick scale (8 epochs, 2 seeds), with tolerances."""
    figure = tmp_path / "curves.png"
    with jax.numpy_dtype_promotion("standard"):
        out = LOWRANK["main"](["--quick", "--figure", str(figure)])
    assert set(out["curves"]) == {"adam-1e-3", "sgd-0.05"}
    for curves in out["curves"].values():
        assert set(curves) == {("full", None), ("full_torch", None)} | {
            (v, r) for v in ("rank_aware", "autoencoder", "autoencoder_torch") for r in (2, 16)
        }
        for accuracy in curves.values():
            assert accuracy.shape == (2, 9) and np.all((accuracy >= 0) & (accuracy <= 1))
            assert np.all(accuracy[:, 0] < 0.3)  # untrained
        assert np.all(curves["full", None][:, -1] > 0.93)
        # Too small a rank hurts: r = 2 ends far below r = 16 with the rank-aware init, per seed.
        assert np.all(curves["rank_aware", 2][:, -1] < curves["rank_aware", 16][:, -1] - 0.2)
    # SGD at lr 0.05: the unbalanced autoencoder init at r = 2 diverges to chance on every seed,
    # the balanced rank-aware one learns.
    sgd = out["curves"]["sgd-0.05"]
    assert np.all(sgd["autoencoder", 2][:, -1] < 0.2) and np.all(sgd["rank_aware", 2][:, -1] > 0.4)
    # Seed 003 as posed: PyTorch's default (a third of the variance) trails the variance-matched
    # Flax autoencoder after one epoch (full scale: 0.2-0.5 lower from r = 16 on) with either
    # optimizer, and its smaller SGD steps keep r = 2 from collapsing (0/5 seeds against 5/5).
    for curves in out["curves"].values():
        torch, flax = curves["autoencoder_torch", 16][:, 1], curves["autoencoder", 16][:, 1]
        assert torch.mean() < flax.mean() - 0.1, (torch, flax)
    assert np.all(sgd["autoencoder_torch", 2][:, -1] > 0.4)
    assert figure.stat().st_size > 10_000
    assert pathlib.Path(out["seed_003_figure"]).stat().st_size > 10_000


@pytest.mark.slow
def test_budget_ablation_quick_run(capsys):
    """Section 2's Table 5 at a fixed budget, at the --quick scale (200 steps, 2 seeds, lr 5e-3)."""
    with jax.numpy_dtype_promotion("standard"):
        out = BUDGET["main"](["--quick"])
    results = out["results"]
    assert list(results) == list(BUDGET["CONFIGS"])
    for config, runs in results.items():
        assert [r["seed"] for r in runs] == [0, 1] and {r["lr"] for r in runs} == {5e-3}
        assert all(r["trainable"] == 4096 for r in runs), config  # one budget for all
        assert all(0 <= r["accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1 for r in runs)
    # The claims of docs/experiments.md, section 2 (full scale: v or o alone within 0.03 of the
    # base, every configuration with q or k 0.6-0.9 above it).
    base = out["base"]["accuracy"]
    assert base < 0.2
    mean = {c: np.mean([r["accuracy"] for r in runs]) for c, runs in results.items()}
    assert mean["v"] < base + 0.06 and mean["o"] < base + 0.06, mean
    for config in ("q", "k", "q,k", "q,v", "q,k,v,o"):
        assert mean[config] > base + 0.25, (config, mean)
    printed = capsys.readouterr().out
    assert "| {q,k,v,o} | 2 | 4,096 | 4.000 |" in printed


@pytest.mark.slow
def test_update_dynamics_quick_run(tmp_path):
    """Section 3's delta W claims at the --quick scale (200 steps, r = 4 and 64, 2 seeds)."""
    with jax.numpy_dtype_promotion("standard"):
        out = DYNAMICS["main"](["--quick", "--figures", str(tmp_path)])
    m = out["measures"]
    for layer, name in ((0, "query"), (0, "value"), (1, "query"), (1, "value")):
        for step in (100, 200):
            for rank in (4, 64):
                for x in m[rank, 200, step, layer, name]:
                    assert x["grid"].shape == (rank, 64)
                    assert np.all((x["grid"] >= -1e-12) & (x["grid"] <= 1 + 1e-12))
                    assert 1 - 1e-9 <= x["stable_rank"] <= rank + 1e-9
            # Amplification: large at r = 4, small at r = 64, at every snapshot.
            amplification = {
                r: np.mean([x["amplification"] for x in m[r, 200, step, layer, name]])
                for r in (4, 64)
            }
            assert amplification[4] > 2 * amplification[64], (layer, name, step, amplification)
            # Two seeds' top-8 delta W directions overlap far above chance (8 / 128).
            pair = DYNAMICS["seed_matrix"](m[64, 200, step, layer, name])[0, 1]
            assert pair > 3 * 8 / 128, (layer, name, step, pair)
        # delta W is effectively rank 1-2 even at r = 64: its top 4 directions hold most of it.
        assert all(x["top4"] > 0.8 for x in m[64, 200, 200, layer, name]), (layer, name)
    # Figure 7: layer-0 W_q's update lies in W's top directions (full scale: phi(1, 32) 0.72-0.82,
    # chance 0.25); layer-0 W_v's does not (0.24-0.27).
    phi_1_32 = {
        name: np.mean([x["grid"][0, 31] for x in m[64, 200, 200, 0, name]])
        for name in ("query", "value")
    }
    assert phi_1_32["query"] > 0.5 and phi_1_32["value"] < 0.45, phi_1_32
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"fig7_delta_vs_w.png", "delta_spectrum.png", "delta_dynamics.png",
                       "delta_seed_matrix.png"}  # fmt: skip
