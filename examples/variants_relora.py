"""examples/variants.py's experiment C: ReLoRA's rank growth against LoRA and the full fine-tune."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import numpy as np
from rank_ablation import markdown_table
from variants_methods import fmt, lora_config
from variants_tasks import Task, adam_tx, schedule_for, train

import jlora
import jlora.analysis as an
import jlora.linen
import jlora.variants as jv

# ----------------------------------------------------------------------------------------------
# Experiment C: ReLoRA's rank growth against LoRA and the full fine-tune.

RELORA_RESET = 1.0
"""A full reset of the factors' moments: the paper's 0.99 partial prune diverged in jlora's own
test problem (``reset_optimizer_state``'s docstring); ``1`` is the authors' code's default."""


def _w(params: Any, path: str) -> np.ndarray:
    return np.asarray(dict(jlora._paths.leaves_with_paths(params))[path], np.float64)


def numerical_rank(s: np.ndarray, tol: float = 1e-3) -> int:
    return int(np.sum(s > tol * s[0]))


def experiment_c(task: Task, seeds, lr: float, lora_trained: dict, *, every: int, full_lr: float):
    """ReLoRA runs; per seed the updates of ReLoRA (after each restart), LoRA and full FT."""
    rank = task.rank
    config = lora_config(task, rank, 2.0 * rank)
    lm = jlora.linen.lora(task.model, config)
    steps = task.steps
    sched = jv.relora_schedule(1.0, total_steps=steps, restart_every=every,
                               warmup_steps=steps // 10,
                               restart_warmup_steps=every // 10)  # fmt: skip
    tx = adam_tx(sched)
    loss = lambda a, p, tokens: task.loss(lm.apply(p, a, tokens), tokens)  # noqa: E731
    out = {"relora": [], "lora": [], "full": [], "scores": {"ReLoRA": [], "LoRA": [], "full": []}}
    for seed in seeds:
        snapshots = []

        def between(done, adapters, params, opt_state, seed=seed, snapshots=snapshots):
            key = jax.random.fold_in(jax.random.key(500 + seed), done)
            params, adapters = jv.merge_and_reinit(key, params, adapters, config)
            snapshots.append({p: _w(params, p) - _w(task.params, p) for p in task.weights})
            return adapters, params, jv.reset_optimizer_state(opt_state, RELORA_RESET)

        adapters = lm.init_adapters(jax.random.key(100 + seed), task.params, task.sample)
        adapters, params = train(loss, adapters, task.params, task.make, tx, steps=steps, lr=lr,
                                 key=jax.random.key(200 + seed), between=between, chunk=every,
                                 cache="relora")  # fmt: skip
        final = jlora.merge(params, adapters)
        snapshots.append({p: _w(final, p) - _w(task.params, p) for p in task.weights})
        out["relora"].append(snapshots)
        scores = out["scores"]
        scores["ReLoRA"].append(task.scores(lm.apply(params, adapters, task.test), task.test))
        lora_final = jlora.merge(task.params, lora_trained[seed])
        out["lora"].append({p: _w(lora_final, p) - _w(task.params, p) for p in task.weights})
        lora_logits = lm.apply(task.params, lora_trained[seed], task.test)
        scores["LoRA"].append(task.scores(lora_logits, task.test))
        full, _ = train(
            lambda p, _, tokens: task.loss(task.model.apply({"params": p}, tokens), tokens),
            task.params, None, task.make, adam_tx(schedule_for(1.0, steps)), steps=steps,
            lr=full_lr, key=jax.random.key(200 + seed), cache="full",
        )  # fmt: skip
        out["full"].append({p: _w(full, p) - _w(task.params, p) for p in task.weights})
        scores["full"].append(task.scores(task.model.apply({"params": full}, task.test), task.test))
        print(f"  ReLoRA seed {seed}: {time.strftime('%H:%M:%S')}", flush=True)
    return out


def _svd(d: np.ndarray):
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return u, s, vt.T


def captured(d_full: np.ndarray, d: np.ndarray, k: int) -> float:
    """Fraction of ``||d_full||_F^2`` inside the top-``k`` input x output directions of ``d``."""
    u, _, v = _svd(d)
    return float(np.sum((u[:, :k].T @ d_full @ v[:, :k]) ** 2) / np.sum(d_full**2))


def table_c(task: Task, res: dict) -> tuple[str, str]:
    k_max = len(res["relora"][0])
    r = task.rank
    rank_rows = []
    for path in task.weights:
        per_k = [[numerical_rank(_svd(snap[k][path])[1]) for snap in res["relora"]]
                 for k in range(k_max)]  # fmt: skip
        lora = [numerical_rank(_svd(d[path])[1]) for d in res["lora"]]
        full = [numerical_rank(_svd(d[path])[1]) for d in res["full"]]
        rank_rows.append([path.replace("/kernel", ""), *[f"{min(v)}-{max(v)}" for v in per_k],
                          f"{min(lora)}-{max(lora)}", f"{min(full)}-{max(full)}"])  # fmt: skip
    segments = [f"ReLoRA, {k + 1} segment{'s' if k else ''} (<= {(k + 1) * r})"
                for k in range(k_max)]  # fmt: skip
    head = ["weight", *segments,
            f"LoRA r={r}", "full fine-tune"]  # fmt: skip
    ranks = markdown_table(head, rank_rows)
    k_top = k_max * r
    rows = []
    for path in task.weights:
        def stat(fn, name):
            return [fn(s[-1][path] if name == "relora" else s[path], f[path])
                    for s, f in zip(res[name], res["full"], strict=True)]  # fmt: skip

        def phi_in(d, f):
            return an.subspace_similarity(_svd(d)[0][:, :r], _svd(f)[0][:, :r])

        def phi_out(d, f):
            return an.subspace_similarity(_svd(d)[2][:, :r], _svd(f)[2][:, :r])

        def stable(d, f):  # ||d||_F^2 / sigma_1^2
            del f
            s = _svd(d)[1]
            return float(np.sum(s**2) / s[0] ** 2)

        rows.append([
            path.replace("/kernel", ""),
            fmt(stat(stable, "lora"), clip=(1.0, np.inf)),
            fmt(stat(stable, "relora"), clip=(1.0, np.inf)),
            fmt(stat(phi_in, "lora")), fmt(stat(phi_in, "relora")),
            fmt(stat(phi_out, "lora")), fmt(stat(phi_out, "relora")),
            fmt(stat(lambda d, f: captured(f, d, r), "lora")),
            fmt(stat(lambda d, f: captured(f, d, k_top), "relora")),
            f"{(r / d_model(task)) ** 2:.4f} / {(k_top / d_model(task)) ** 2:.4f}",
        ])  # fmt: skip
    header = ["weight", "stable rank LoRA", "stable rank ReLoRA",
              f"phi_in top-{r} LoRA vs full", f"phi_in top-{r} ReLoRA vs full",
              f"phi_out top-{r} LoRA vs full", f"phi_out top-{r} ReLoRA vs full",
              f"full's energy in LoRA's top-{r}", f"full's energy in ReLoRA's top-{k_top}",
              "chance (random subspaces)"]  # fmt: skip
    return ranks, markdown_table(header, rows)


def d_model(task: Task) -> int:
    return int(np.shape(_w(task.params, task.weights[0]))[0])


def figure_c(task: Task, res: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(task.weights)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), sharey=True)
    for ax, w in zip(axes, task.weights, strict=True):
        for name, color in (("full", "k"), ("relora", "C1"), ("lora", "C0")):
            for snap in res[name]:
                d = snap[-1][w] if name == "relora" else snap[w]
                s = _svd(d)[1]
                ax.semilogy(np.arange(1, s.size + 1), s / s[0], color=color, lw=0.8, alpha=0.7)
            ax.plot([], [], color=color, label={"full": "full fine-tune", "relora": "ReLoRA",
                                                "lora": f"LoRA r={task.rank}"}[name])  # fmt: skip
        ax.set_ylim(1e-4, 1.5)
        ax.set_xlim(0, 48)
        ax.set_title(w.replace("/kernel", ""))
        ax.set_xlabel("singular value index")
    axes[0].set_ylabel("sigma_i / sigma_1 of W - W0")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
