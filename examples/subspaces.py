"""The LoRA paper's rank/target ablation and subspace analysis (Hu et al. 2022, section 7), tiny.

Experiment 2 (the paper's Tables 5 and 6, ``rank_ablation.py``): a decoder pretrained to *copy* a
sequence is LoRA-adapted to *reverse* it, at ranks {1, 2, 4, 8, 64} on {q}, {q, v}, {q, k, v, o},
5 seeds per cell (mean, 95% t-interval, per-seed range).

Experiment 3 (Figures 3 and 4, Table 7): for the q and v adapters of the {q, v} runs compare the
input-side singular directions (the paper's right-singular vectors of ``A``) of r = 8 with r = 64
of the same seed, and of every pair of r = 64 seeds, with the paper's ``phi`` (and the output
side, from ``b``); and project the frozen weight onto its update's top directions
(``jlora.analysis.update_projection``). Chance levels come from independent random subspace pairs
(:func:`chance_levels`) or closed forms (:func:`random_phi`, :func:`random_projection_rms`).

Run: ``python examples/subspaces.py --figures docs/figures --save runs.pkl`` (``--quick`` for a
two-minute smoke run; ``--load runs.pkl`` redoes experiment 3 without training). Prints markdown
tables; writes the heatmaps to ``--figures``."""

from __future__ import annotations

import argparse
import pathlib
import pickle
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.analysis as an
import jlora.linen

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decoder_tasks import Spec
from rank_ablation import (
    RANKS,
    TARGETS,
    Runs,
    ablation_table,
    experiment_2,
    interval,
    markdown_table,
)

RUN_FIELDS = ("params", "adapters", "initial")


def random_phi(i: int, j: int, n: int) -> float:
    """Expected ``phi`` of independent uniformly random ``i``- and ``j``-dim subspaces of R^n.

    ``E ||U1^T U2||_F^2 = i j / n``, so ``E phi = max(i, j) / n``: the chance level of a grid cell.
    """
    return max(i, j) / n


def random_projection_rms(weight: np.ndarray, rank: int) -> float:
    """``sqrt(E ||U^T W V||_F^2)`` for independent uniformly random ``U (d, r)``, ``V (k, r)``.

    ``E U U^T = (r / d) I`` and ``E V V^T = (r / k) I``, so ``E ||U^T W V||_F^2 = r^2 ||W||_F^2 /
    (d k)``: the closed form of the paper's "random" row of Table 7.
    """
    d, k = weight.shape
    return float(rank * np.linalg.norm(weight) / np.sqrt(d * k))


def chance_levels(n: int, *, draws: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """phi cells and top-8 Grassmann distances of *independent* random subspace pairs of R^n.

    Each draw takes two independent Haar-random 64-dimensional bases (QR of Gaussians); the
    leading ``i`` columns of each span a uniformly random ``i``-dimensional subspace, so one grid
    gives every cell's null distribution. Returns ``{cell: (draws,) values}``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {"(1,1)": [], "(8,8)": [], "(64,64)": [], "grassmann8": []}
    width = min(64, n)
    for _ in range(draws):
        u1, u2 = (np.linalg.qr(rng.normal(size=(n, width)))[0] for _ in range(2))
        grid = an.subspace_similarity_grid(u1, u2)
        out["(1,1)"].append(grid[0, 0])
        out["(8,8)"].append(grid[7, 7])
        out["(64,64)"].append(grid[-1, -1])
        out["grassmann8"].append(an.grassmann_distance(u1[:, :8], u2[:, :8]))
    return {k: np.asarray(v) for k, v in out.items()}


def _factors(runs: Runs, key: tuple[str, int, int], layer: int, name: str) -> jlora.LoraFactors:
    return runs.adapters[key][f"layers_{layer}"][name]["kernel"]


def seeds_of(runs: Runs, rank: int) -> list[int]:
    """The seeds with a trained {q, v} adapter of ``rank``."""
    return sorted(s for t, r, s in runs.adapters if t == "q,v" and r == rank)


def phi_grids(runs: Runs, layer: int, name: str, side: str) -> dict[str, object]:
    """phi of r = 8 vs r = 64 per seed (8 x 64 grids) and of every pair of r = 64 seeds (64 x 64).

    Returns ``{"r8_r64": {seed: grid}, "seeds": {(s, t): grid}, "grassmann8": {(s, t): d}}``.
    """
    seeds = seeds_of(runs, 64)
    basis = {
        (r, s): an.singular_basis(_factors(runs, ("q,v", r, s), layer, name), side)
        for r in (8, 64)
        for s in (seeds if r == 64 else seeds_of(runs, 8))
    }
    pairs = [(s, t) for s in seeds for t in seeds if s < t]
    return {
        "r8_r64": {
            s: an.subspace_similarity_grid(basis[8, s], basis[64, s])
            for s in seeds_of(runs, 8)
            if (64, s) in basis
        },
        "seeds": {p: an.subspace_similarity_grid(basis[64, p[0]], basis[64, p[1]]) for p in pairs},
        "grassmann8": {
            p: an.grassmann_distance(basis[64, p[0]][:, :8], basis[64, p[1]][:, :8]) for p in pairs
        },
    }


def phi_keys(runs: Runs) -> list[tuple[int, str, str]]:
    """``(layer, weight, side)`` of every q and v adapter, in table order."""
    return [
        (layer, name, side)
        for layer in range(runs.spec.layers)
        for name in ("query", "value")
        for side in ("input", "output")
    ]


def _init_grid(runs: Runs, layer: int, name: str, seed: int) -> np.ndarray:
    """phi of the *initial* ``a`` of r = 8 vs r = 64: what the trained grid is compared against."""
    r8, r64 = (
        an.singular_basis(runs.initial["q,v", r, seed][f"layers_{layer}"][name]["kernel"], "input")
        for r in (8, 64)
    )
    return an.subspace_similarity_grid(r8, r64)


def _drift(runs: Runs, layer: int, name: str, seed: int) -> float:
    """``||a - a_init|| / ||a_init||`` of an r = 64 run: how far training moved the random ``a``."""
    key = ("q,v", 64, seed)
    a, a0 = (
        _factors(runs, key, layer, name).a,
        runs.initial[key][f"layers_{layer}"][name]["kernel"].a,
    )
    return float(jnp.linalg.norm(a - a0) / jnp.linalg.norm(a0))


def _ci(values: list[float] | np.ndarray, *, phi: bool = False) -> str:
    """``mean [95% interval]`` over seeds; phi's interval is clipped to its range [0, 1]."""
    mean, lo, hi = interval(values)
    if phi:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _range(values: list[float] | np.ndarray) -> str:
    values = np.asarray(values)
    if values.size < 2:
        return f"{values.mean():.3f}"
    return f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"


def _plot(g: dict, layer: int, name: str, random_grid: np.ndarray, figures: pathlib.Path) -> None:
    title = f"layer {layer} W_{name[0]}"
    first_seed, first_pair = min(g["r8_r64"]), min(g["seeds"])
    an.plot_subspace_similarity(
        g["r8_r64"][first_seed], str(figures / f"phi_r8_r64_{name}.png"),
        title=f"{title}: phi(A_r=8, A_r=64), seed {first_seed}",
        ylabel="i (r = 8)", xlabel="j (r = 64)",
    )  # fmt: skip
    an.plot_subspace_similarity(
        g["seeds"][first_pair], str(figures / f"phi_seeds_{name}.png"),
        title=f"{title}: r = 64 seeds {first_pair[0]} and {first_pair[1]}",
        ylabel=f"i (seed {first_pair[0]})", xlabel=f"j (seed {first_pair[1]})",
    )  # fmt: skip
    # The text reads the top-left corner: zoom on it, averaged over seeds and over seed pairs,
    # next to the same corner for random subspaces.
    zoom = np.concatenate(
        [np.mean([x[:8, :8] for x in g["r8_r64"].values()], 0),
         np.mean([x[:8, :8] for x in g["seeds"].values()], 0), random_grid[:8, :8]], axis=1,
    )  # fmt: skip
    an.plot_subspace_similarity(
        zoom, str(figures / f"phi_zoom_{name}.png"),
        title=f"{title} input, 8x8 corner: r8 vs r64 | r64 seed pairs | random",
        xlabel="j (three 8-column panels)", ylabel="i",
    )  # fmt: skip


def _seed_matrix(g: dict, seeds: list[int]) -> np.ndarray:
    """phi(8, 8) between every pair of r = 64 seeds (1 on the diagonal)."""
    m = np.eye(len(seeds))
    for (s, t), grid in g["seeds"].items():
        m[seeds.index(s), seeds.index(t)] = m[seeds.index(t), seeds.index(s)] = grid[7, 7]
    return m


def experiment_3(runs: Runs, plot_layer: int, figures: pathlib.Path) -> tuple[str, dict]:
    """phi tables over seeds and projections for every layer's q and v; heatmaps for one layer."""
    n = runs.spec.d_model
    chance = chance_levels(n)
    gaussians = np.random.default_rng(1).normal(size=(2, n, 64))
    random_grid = an.subspace_similarity_grid(
        *(np.linalg.svd(g, full_matrices=False)[0] for g in gaussians)
    )
    an.plot_subspace_similarity(
        random_grid, str(figures / "phi_random.png"), title=f"two random Gaussian {n} x 64 matrices"
    )
    seeds = seeds_of(runs, 64)
    phi_rows, projection_rows, metrics = [], [], {"chance": chance}
    for layer, name, side in phi_keys(runs):
        g = metrics[layer, name, side] = phi_grids(runs, layer, name, side)
        if side == "input" and layer == plot_layer:
            _plot(g, layer, name, random_grid, figures)
            an.plot_subspace_similarity(
                _seed_matrix(g, seeds), str(figures / f"phi_seed_matrix_{name}.png"),
                title=f"L{layer} W_{name[0]}: phi(8,8), r=64 seeds",
                xlabel="seed + 1", ylabel="seed + 1",
            )  # fmt: skip
        per_seed = list(g["r8_r64"].values())
        pairs = list(g["seeds"].values())
        top = np.array([x[-1, -1] for x in pairs])
        z = (top.mean() - chance["(64,64)"].mean()) / chance["(64,64)"].std()
        drift = [_drift(runs, layer, name, s) for s in seeds] if side == "input" else None
        phi_rows.append(
            [layer, f"W_{name[0]}", side, _ci([x[0, 0] for x in per_seed], phi=True),
             _ci([x[7, 7] for x in per_seed], phi=True), _range([x[0, 0] for x in pairs]),
             _range([x[7, 7] for x in pairs]), _range(top), f"{z:+.1f}",
             _range(list(g["grassmann8"].values())), "-" if drift is None else _range(drift)]
        )  # fmt: skip
    for layer in range(runs.spec.layers):
        for name in ("query", "value"):
            weight = np.asarray(runs.params[f"layers_{layer}"][name]["kernel"], np.float64)
            for rank in (4, 64):
                ps = [
                    an.update_projection(
                        weight,
                        jlora.delta(runs.adapters["q,v", rank, s])[f"layers_{layer}"][name][
                            "kernel"
                        ],
                        rank=rank,
                    )
                    for s in seeds_of(runs, rank)
                ]
                metrics[layer, name, rank] = ps
                projection_rows.append(
                    [layer, f"W_{name[0]}", rank, _ci([p.onto_delta for p in ps]),
                     f"{ps[0].onto_weight:.3f}", f"{random_projection_rms(weight, rank):.3f}",
                     f"{ps[0].weight_norm:.3f}", _ci([p.delta_norm for p in ps]),
                     _ci([p.amplification for p in ps])]
                )  # fmt: skip
    init = np.stack(
        [_init_grid(runs, layer, name, s) for layer, name, side in phi_keys(runs)
         if side == "input" for s in seeds_of(runs, 8) if ("q,v", 64, s) in runs.initial]
    )  # fmt: skip
    summary = "; ".join(  # the tail that a learned overlap would beat: phi up, distance down
        f"{cell} {v.mean():.3f} ± {v.std():.3f} ("
        + (
            f"2.5th percentile {np.quantile(v, 0.025):.3f})"
            if cell == "grassmann8"
            else f"97.5th percentile {np.quantile(v, 0.975):.3f})"
        )
        for cell, v in chance.items()
    )
    text = (
        f"Chance (1,000 independent pairs of random subspaces of R^{n}, mean ± SD): {summary}. "
        f"Closed forms: E phi(i, j) = max(i, j) / {n}: (1,1) {random_phi(1, 1, n):.4f}, (8,8) "
        f"{random_phi(8, 8, n):.4f}, (64,64) {random_phi(64, 64, n):.4f}. The untrained `a` of "
        f"r = 8 and r = 64 (same seed) overlap at most {init[:, 0, 0].max():.3f} at (1,1) and "
        f"{init[:, 7, 7].max():.3f} at (8,8) over {init.shape[0]} cases.\n\n"
    )
    phi_header = ["layer", "weight", "side", "phi r8-r64 (1,1) [95% CI]",
                  "phi r8-r64 (8,8) [95% CI]", "phi seeds (1,1) (min-max)",
                  "phi seeds (8,8) (min-max)", "phi seeds (64,64) (min-max)",
                  "(64,64): mean's z vs chance", "Grassmann seeds top-8 (min-max)",
                  "‖a − a_init‖ / ‖a_init‖"]  # fmt: skip
    projection_header = ["layer", "weight", "r", "‖Uᵀ W V‖ onto ΔW [95% CI]", "onto W",
                         "random (closed form)", "‖W‖", "‖ΔW‖ [95% CI]",
                         "amplification [95% CI]"]  # fmt: skip
    text += (
        f"### phi over seeds\n\n{markdown_table(phi_header, phi_rows)}\n\n"
        f"### Projections\n\n{markdown_table(projection_header, projection_rows)}"
    )
    return text, metrics


def main(argv: list[str] | None = None) -> dict:
    """Runs both experiments, prints their markdown tables and returns the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about two minutes: 200 steps, {q, v} at r in 4, 8, 64, two seeds",
    )
    parser.add_argument(
        "--figures", default=None, help="where the heatmaps go (default: a temp dir)"
    )
    parser.add_argument("--layer", type=int, default=0, help="the layer whose heatmaps are drawn")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per cell (default 5; quick 2)"
    )
    parser.add_argument("--save", default=None, help="pickle the trained adapters and scores here")
    parser.add_argument(
        "--load", default=None, help="skip training: report on a --save pickle (trusted files only)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=8.0,
        help="LoRA alpha (scale alpha / r), fixed over r as in the paper",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    figures = pathlib.Path(args.figures or tempfile.mkdtemp(prefix="jlora-subspaces-"))
    figures.mkdir(parents=True, exist_ok=True)
    if args.load:
        with open(args.load, "rb") as f:
            saved = pickle.load(f)
        runs = types.SimpleNamespace(spec=Spec(), **{k: saved[k] for k in RUN_FIELDS})
        copy, ablation = saved["copy"], saved["ablation"]
        table_2 = ablation_table(ablation)
    else:
        steps = (200, 200) if args.quick else (400, 500)
        runs = Runs(Spec(), pretrain_steps=steps[0], adapt_steps=steps[1], alpha=args.alpha)
        copy = runs.base("copy")
        ranks, targets = ((4, 8, 64), ("q,v",)) if args.quick else (RANKS, tuple(TARGETS))
        seeds = tuple(range(args.seeds or (2 if args.quick else 5)))
        table_2, ablation = experiment_2(runs, ranks, targets, seeds)
        if args.save:
            fields = {k: getattr(runs, k) for k in RUN_FIELDS}
            with open(args.save, "wb") as f:
                pickle.dump(jax.device_get({**fields, "ablation": ablation, "copy": copy}), f)
    print(f"base model: copy accuracy {copy['accuracy']:.3f}, exact {copy['exact']:.3f}")
    print(
        f"## Experiment 2: copy -> reverse (LoRA alpha {args.alpha:g})\n\n{table_2}\n", flush=True
    )
    table_3, subspaces = experiment_3(runs, args.layer, figures)
    print(
        f"## Experiment 3\n\n{table_3}\n\nfigures in {figures}\ndone in {time.perf_counter() - start:.0f}s"
    )
    return {
        "copy": copy,
        "ablation": ablation,
        "subspaces": subspaces,
        "figures": figures,
        "params": runs.params,
    }


if __name__ == "__main__":
    main()
