"""delta W against W (the LoRA paper's Figure 7), delta W's spectrum, and phi over training.

The decoder of ``decoder_tasks.py``, pretrained to *copy* (400 steps), is LoRA-adapted to
*reverse* on {q, v} at r = 4, 8 and 64 (alpha 8, lr 5e-3: experiment 2's settings), 5 seeds
each, with a snapshot of the adapters every 100 of the 500 steps; r = 4 and 64 also train for 200
steps in all (its own warm-up and cosine decay), which is the ``--quick`` length of
``subspaces.py``. For every snapshot, layer, weight (q, v) and seed:

* Figure 7: ``phi(i, j)`` between the top-``i`` left singular vectors of ``delta W`` (directions of
  the input space; the weight is Flax's ``(fan_in, fan_out)`` kernel) and the top-``j`` ones of
  the frozen ``W``; chance is ``max(i, j) / 128`` (``subspaces.random_phi``).
* The singular spectrum of ``delta W``: the share of ``||delta W||_F^2`` in its top 1 and top 4
  directions, and its stable rank ``||delta W||_F^2 / sigma_1^2``.
* The amplification factor ``||delta W||_F / ||U^T W V||_F`` (``jlora.analysis.update_projection``).
* ``phi(8, 8)`` between the top-8 input directions of ``delta W`` of every pair of the r = 64
  seeds (the seed-by-seed matrix), and ``phi(1, 1)`` between r = 8 and r = 64 of one seed.

Run: ``python examples/update_dynamics.py --figures docs/figures --save dynamics.pkl`` (``--quick``:
200 pretraining and adaptation steps, r = 4 and 64, 2 seeds; ``--load`` redraws without training).
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.analysis as an
import jlora.linen

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decoder_tasks import Spec, answer_loss, fit_many, make_batch
from rank_ablation import BATCH, Runs, interval, markdown_table

WEIGHTS = ("query", "value")
CORNER = 8


def train(runs: Runs, rank: int, seeds: tuple[int, ...], steps: int) -> dict[int, list[dict]]:
    """{q, v} adapters of ``rank`` per seed (init key 100 + s, batches 200 + s), every 100 steps.

    Returns ``{step: [adapters of each seed]}`` on the host.
    """
    config = jlora.LoraConfig(targets=r"layers_\d+/(query|value)/kernel", rank=rank, alpha=8.0)
    model = jlora.linen.lora(runs.model, config)
    initial = [
        model.init_adapters(jax.random.key(100 + s), runs.params, runs.test[:1]) for s in seeds
    ]
    snapshots: dict[int, list[dict]] = {}

    def keep(step: int, stacked: object) -> None:
        host = jax.device_get(stacked)
        snapshots[step] = [
            jax.tree.map(lambda x: x[m], host)  # noqa: B023
            for m in range(len(seeds))
        ]

    fit_many(
        lambda a, p, tokens: answer_loss(model.apply(p, a, tokens), tokens, runs.spec),
        jax.tree.map(lambda *x: jnp.stack(x), *initial),
        runs.params,
        lambda k: make_batch(k, runs.spec, "reverse", BATCH),
        steps=steps,
        lrs=jnp.full((len(seeds),), 5e-3),
        keys=jnp.stack([jax.random.key(200 + s) for s in seeds]),
        on_chunk=keep,
    )
    return snapshots


def _delta(adapters: dict, layer: int, name: str) -> np.ndarray:
    """``delta W = scale * a @ b`` of one 2-D kernel, in float64 on the host.

    ``jlora.delta`` gives the same (tested); one host matmul per weight is much cheaper than
    dispatching it for each of the hundreds of snapshots.
    """
    f = adapters[f"layers_{layer}"][name]["kernel"]
    return f.scale * (np.asarray(f.a, np.float64) @ np.asarray(f.b, np.float64))


def _left(x: np.ndarray, k: int) -> np.ndarray:
    return np.linalg.svd(x, full_matrices=False)[0][:, :k]


def measure(weight: np.ndarray, delta: np.ndarray, rank: int) -> dict[str, object]:
    """Figure 7's grid, the spectrum and the amplification of one update of ``rank``."""
    sigma = np.linalg.svd(delta, compute_uv=False)[:rank]
    energy = sigma**2 / np.sum(sigma**2)
    projection = an.update_projection(weight, delta, rank=rank)
    return {
        "grid": an.subspace_similarity_grid(_left(delta, rank), _left(weight, 64)),
        "sigma": sigma,
        "top1": float(energy[0]),
        "top4": float(energy[:4].sum()),
        "stable_rank": float(np.sum(sigma**2) / sigma[0] ** 2),
        "amplification": projection.amplification,
        "top_dirs": _left(delta, min(CORNER, rank)),
    }


def analyse(runs: Runs, snapshots: dict[tuple[int, int], dict[int, list[dict]]]) -> dict:
    """``{(rank, steps, step, layer, name): [measure() per seed]}`` for every snapshot."""
    out = {}
    for (rank, steps), by_step in snapshots.items():
        for step, per_seed in by_step.items():
            for layer in range(runs.spec.layers):
                for name in WEIGHTS:
                    weight = np.asarray(runs.params[f"layers_{layer}"][name]["kernel"], np.float64)
                    out[rank, steps, step, layer, name] = [
                        measure(weight, _delta(a, layer, name), rank) for a in per_seed
                    ]
    return out


def seed_matrix(measures: list[dict]) -> np.ndarray:
    """``phi(8, 8)`` between the top-8 directions of every pair of seeds (1 on the diagonal)."""
    n = len(measures)
    return np.array(
        [[an.subspace_similarity(measures[s]["top_dirs"], measures[t]["top_dirs"])
          for t in range(n)] for s in range(n)]
    )  # fmt: skip


def _ci(values: list[float], low: float = 0.0, high: float = np.inf) -> str:
    """``mean [95% interval]`` over seeds, the interval clipped to the quantity's range."""
    mean, lo, hi = interval(values)
    lo, hi = max(lo, low), min(hi, high)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _pairs(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(len(matrix), 1)]


def tables(m: dict, ranks: tuple[int, ...], steps: int, layers: int, short: int | None) -> str:
    """Figure 7's cells, the spectrum, and the quantities over training, as markdown."""
    n = 128
    fig7, spectrum, dynamics, phis = [], [], [], []
    checkpoints = sorted({k[2] for k in m if k[1] == steps})
    for layer in range(layers):
        for name in WEIGHTS:
            for rank in ranks:
                final = m[rank, steps, steps, layer, name]
                c = min(CORNER, rank)
                fig7.append(
                    [layer, f"W_{name[0]}", rank, _ci([x["grid"][0, 0] for x in final], high=1.0),
                     f"{1 / n:.3f}", _ci([x["grid"][c - 1, c - 1] for x in final], high=1.0),
                     f"{c / n:.3f}",
                     _ci([x["grid"][0, 31] for x in final], high=1.0), f"{32 / n:.3f}"]
                )  # fmt: skip
                spectrum.append(
                    [layer, f"W_{name[0]}", rank, _ci([x["top1"] for x in final], high=1.0),
                     _ci([x["top4"] for x in final], high=1.0),
                     _ci([x["stable_rank"] for x in final], low=1.0)]
                )  # fmt: skip
                row = [layer, f"W_{name[0]}", rank] + [
                    _ci([x["amplification"] for x in m[rank, steps, s, layer, name]])
                    for s in checkpoints
                ]
                key = (rank, short, short, layer, name)
                row.append(_ci([x["amplification"] for x in m[key]]) if key in m else "-")
                dynamics.append(row)
            if 64 in ranks:
                row = [layer, f"W_{name[0]}"]
                for s in checkpoints:
                    pairs = _pairs(seed_matrix(m[64, steps, s, layer, name]))
                    row.append(f"{pairs.mean():.3f} ({pairs.min():.3f}-{pairs.max():.3f})")
                if 8 in ranks:
                    row += [
                        _ci([an.subspace_similarity(a["top_dirs"][:, :1], b["top_dirs"][:, :1])
                             for a, b in zip(m[8, steps, s, layer, name],
                                             m[64, steps, s, layer, name], strict=True)],
                            high=1.0)
                        for s in (checkpoints[0], checkpoints[-1])
                    ]  # fmt: skip
                phis.append(row)
    fig7_header = ["layer", "weight", "r", "phi(1,1) [95% CI]", "chance", "phi(c,c), c = min(r,8)",
                   "chance", "phi(1,32): top ΔW direction in W's top 32", "chance"]  # fmt: skip
    spectrum_header = ["layer", "weight", "r", "top-1 share of ‖ΔW‖² [95% CI]", "top-4 share",
                       "stable rank ‖ΔW‖²/σ₁²"]  # fmt: skip
    dynamics_header = ["layer", "weight", "r"] + [f"step {s}" for s in checkpoints] + [
        f"{short}-step run, end" if short else "short run"
    ]
    text = (
        f"### Figure 7: phi(ΔW top-i, W top-j), input side, step {steps}\n\n"
        f"{markdown_table(fig7_header, fig7)}\n\n"
        f"### Spectrum of ΔW, step {steps}\n\n{markdown_table(spectrum_header, spectrum)}\n\n"
        f"### Amplification over training [95% CI]\n\n"
        f"{markdown_table(dynamics_header, dynamics)}"
    )
    if phis:
        phi_header = ["layer", "weight"] + [
            f"seeds phi(8,8), step {s} (mean, min-max of pairs)" for s in checkpoints
        ]
        if 8 in ranks:
            phi_header += [f"r8-r64 phi(1,1), step {s}" for s in (checkpoints[0], checkpoints[-1])]
        text += f"\n\n### ΔW's top-8 directions over training\n\n{markdown_table(phi_header, phis)}"
    return text


def _heat(ax: object, grid: np.ndarray, title: str, vmax: float) -> object:
    image = ax.imshow(grid, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto",
                      extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))  # fmt: skip
    if grid.shape[0] <= CORNER:
        ax.set_yticks(range(1, grid.shape[0] + 1))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("j (W)", fontsize=7)
    ax.set_ylabel("i (ΔW)", fontsize=7)
    return image


def plot(m: dict, ranks: tuple[int, ...], steps: int, layer: int, figures: pathlib.Path) -> None:
    """Figure 7 grids with their 8 x 8 corners, the spectra, the dynamics and the seed matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 128
    chance = np.maximum.outer(np.arange(1, 65), np.arange(1, 65)) / n
    fig, axes = plt.subplots(len(WEIGHTS), len(ranks) + 2, figsize=(3.2 * (len(ranks) + 2), 6.4))
    for row, name in zip(axes, WEIGHTS, strict=True):
        grids = {r: np.mean([x["grid"] for x in m[r, steps, steps, layer, name]], 0) for r in ranks}
        top = max(ranks)
        for ax, r in zip(row, ranks, strict=False):
            full = _heat(ax, grids[r], f"L{layer} W_{name[0]}, r = {r}: seed mean", 1.0)
        corner = max(grids[top][:CORNER, :CORNER].max(), chance[CORNER - 1, CORNER - 1])
        _heat(row[-2], grids[top][:CORNER, :CORNER], f"r = {top}: top-left 8x8", corner)
        zoom = _heat(row[-1], chance[:CORNER, :CORNER], "chance max(i,j)/128: 8x8", corner)
        fig.colorbar(full, ax=row[len(ranks) - 1], fraction=0.05)
        fig.colorbar(zoom, ax=row[-1], fraction=0.05)
    fig.suptitle(f"phi between ΔW's top-i and W's top-j input directions, step {steps}")
    fig.tight_layout()
    fig.savefig(figures / "fig7_delta_vs_w.png", dpi=80)
    plt.close(fig)

    layers = sorted({k[3] for k in m})
    fig, axes = plt.subplots(1, len(layers) * len(WEIGHTS), figsize=(13, 3.4), squeeze=False)
    colors = dict(zip(ranks, plt.cm.viridis(np.linspace(0, 0.85, len(ranks))), strict=True))
    for ax, (lay, name) in zip(axes[0], [(a, b) for a in layers for b in WEIGHTS], strict=True):
        for r in ranks:
            sig = np.stack([x["sigma"][: min(r, 16)] for x in m[r, steps, steps, lay, name]])
            sig = sig / np.linalg.norm(sig, axis=1, keepdims=True)
            x = np.arange(1, sig.shape[1] + 1)
            ax.plot(x, sig.T, color=colors[r], lw=0.6, alpha=0.5)
            ax.plot(x, sig.mean(0), "o-", color=colors[r], ms=3, label=f"r = {r}")
        ax.set(title=f"L{lay} W_{name[0]}", xlabel="k", ylabel="σ_k / ‖ΔW‖_F", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"singular values of ΔW (first 16), step {steps}: seeds (thin), mean (dots)")
    fig.tight_layout()
    fig.savefig(figures / "delta_spectrum.png", dpi=80)
    plt.close(fig)

    checkpoints = sorted({k[2] for k in m if k[1] == steps})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    styles = dict(zip(WEIGHTS, ("-", "--"), strict=True))
    for r in ranks:
        for name in WEIGHTS:
            cis = np.array([interval([x["amplification"] for x in m[r, steps, s, layer, name]])
                            for s in checkpoints])  # fmt: skip
            axes[0].plot(checkpoints, cis[:, 0], styles[name], color=colors[r],
                         label=f"r = {r}, W_{name[0]}")  # fmt: skip
            lows = np.maximum(cis[:, 1], 0.1)  # a log axis: the t-interval can reach below 0
            axes[0].fill_between(checkpoints, lows, cis[:, 2], color=colors[r], alpha=0.15)
            shorter = [k[1] for k in m if k[0] == r and k[1] != steps and k[3:] == (layer, name)]
            for length in shorter:  # a run of that many steps in all, at its end
                values = [x["amplification"] for x in m[r, length, length, layer, name]]
                axes[0].plot([length], [np.mean(values)], "x" if name == "query" else "+",
                             color=colors[r], ms=8)  # fmt: skip
    axes[0].set(title=f"layer {layer}: amplification (mean, 95% CI; x +: a shorter run's end)",
                xlabel="step", yscale="log")  # fmt: skip
    if 64 in ranks:
        for name in WEIGHTS:
            pairs = np.array(
                [_pairs(seed_matrix(m[64, steps, s, layer, name])) for s in checkpoints]
            )
            axes[1].plot(checkpoints, pairs.mean(1), styles[name], color="k", label=f"W_{name[0]}")
            axes[1].fill_between(checkpoints, pairs.min(1), pairs.max(1), color="k", alpha=0.1)
        axes[1].axhline(CORNER / n, color="r", lw=0.8, label="chance 8/128")
    axes[1].set(title=f"layer {layer}: phi(8,8) between r = 64 seeds (mean, min-max of pairs)",
                xlabel="step", ylim=(0, 1))  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "delta_dynamics.png", dpi=80)
    plt.close(fig)

    if 64 in ranks:
        shown = [checkpoints[0], checkpoints[len(checkpoints) // 2], checkpoints[-1]]
        fig, axes = plt.subplots(len(WEIGHTS), len(shown), figsize=(3.3 * len(shown), 6.2))
        for row, name in zip(np.atleast_2d(axes), WEIGHTS, strict=True):
            for ax, s in zip(row, shown, strict=True):
                mat = seed_matrix(m[64, steps, s, layer, name])
                image = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
                for (i, j), v in np.ndenumerate(mat):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
                ax.set_title(f"L{layer} W_{name[0]}, step {s}", fontsize=8)
                ax.set(xlabel="seed", ylabel="seed")
            fig.colorbar(image, ax=row[-1], fraction=0.05)
        fig.suptitle("phi(8,8) between the top-8 input directions of ΔW, r = 64 seeds")
        fig.tight_layout()
        fig.savefig(figures / "delta_seed_matrix.png", dpi=80)
        plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Trains (or loads) the snapshots, prints the tables, writes the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 steps, r = 4 and 64, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument("--figures", default=None, help="where the PNGs go (default: a temp dir)")
    parser.add_argument("--save", default=None, help="pickle the snapshots here")
    parser.add_argument("--load", default=None, help="redraw from a --save pickle (trusted only)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    figures = pathlib.Path(args.figures or tempfile.mkdtemp(prefix="jlora-dynamics-"))
    figures.mkdir(parents=True, exist_ok=True)
    steps, short = (200, None) if args.quick else (500, 200)
    ranks = (4, 64) if args.quick else (4, 8, 64)
    if args.load:
        with open(args.load, "rb") as f:
            saved = pickle.load(f)
        runs = Runs.__new__(Runs)
        runs.spec, runs.params = Spec(), saved["params"]
        snapshots = saved["snapshots"]
    else:
        runs = Runs(Spec(), pretrain_steps=400 if not args.quick else 200, adapt_steps=steps,
                    alpha=8.0)  # fmt: skip
        seeds = tuple(range(args.seeds or (2 if args.quick else 5)))
        snapshots = {(r, steps): train(runs, r, seeds, steps) for r in ranks}
        if short:
            for r in (4, 64):
                snapshots[r, short] = {short: train(runs, r, seeds, short)[short]}
        if args.save:
            with open(args.save, "wb") as f:
                pickle.dump({"snapshots": snapshots, "params": jax.device_get(runs.params)}, f)
    print(f"trained in {time.perf_counter() - start:.0f}s", flush=True)
    measures = analyse(runs, snapshots)
    text = tables(measures, ranks, steps, runs.spec.layers, short)
    plot(measures, ranks, steps, 0, figures)
    print(f"{text}\n\nfigures in {figures}\ndone in {time.perf_counter() - start:.0f}s")
    return {"measures": measures, "text": text, "figures": figures, "params": runs.params}


if __name__ == "__main__":
    main()
