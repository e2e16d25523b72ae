"""The LoRA paper's rank/target ablation and subspace analysis (Hu et al. 2022, section 7), tiny.

Experiment 2 (the paper's Tables 5 and 6, ``rank_ablation.py``): a decoder pretrained to *copy* a
sequence is LoRA-adapted to *reverse* it, at ranks {1, 2, 4, 8, 64} on {q}, {q, v}, {q, k, v, o}.

Experiment 3 (Figures 3 and 4, Table 7): for the q and v adapters of the {q, v} runs compare the
input-side singular directions (the paper's right-singular vectors of ``A``) of r = 8 with r = 64,
and of the two r = 64 seeds, with the paper's ``phi`` (and the output side, from ``b``); and
project the frozen weight onto its update's top directions (``jlora.analysis.update_projection``).

Run: ``python examples/subspaces.py --figures docs/figures`` (``--quick`` for a one-minute smoke
run). Prints markdown tables; writes the heatmaps to ``--figures``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np

import jlora
import jlora.analysis as an
import jlora.linen

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decoder_tasks import Spec
from rank_ablation import RANKS, TARGETS, Runs, experiment_2, markdown_table


def random_phi(i: int, j: int, n: int) -> float:
    """Expected ``phi`` of uniformly random ``i``- and ``j``-dimensional subspaces of R^n.

    ``E ||U1^T U2||_F^2 = i j / n``, so ``E phi = max(i, j) / n``: the chance level of a grid cell.
    """
    return max(i, j) / n


def _factors(runs: Runs, key: tuple[str, int, int], layer: int, name: str) -> jlora.LoraFactors:
    return runs.adapters[key][f"layers_{layer}"][name]["kernel"]


def phi_grids(runs: Runs, layer: int, name: str, side: str) -> dict[str, np.ndarray]:
    """phi grids of r = 8 vs r = 64 (8 x 64) and of the two r = 64 seeds (64 x 64), {q, v} runs."""
    r8, r64, r64b = (
        an.singular_basis(_factors(runs, ("q,v", r, s), layer, name), side)
        for r, s in ((8, 0), (64, 0), (64, 1))
    )
    return {
        "r8_r64": an.subspace_similarity_grid(r8, r64),
        "seeds": an.subspace_similarity_grid(r64, r64b),
        "grassmann_seeds_top8": np.float64(an.grassmann_distance(r64[:, :8], r64b[:, :8])),
    }


def phi_keys(runs: Runs) -> list[tuple[int, str, str]]:
    """``(layer, weight, side)`` of every q and v adapter, in table order."""
    return [
        (layer, name, side)
        for layer in range(runs.spec.layers)
        for name in ("query", "value")
        for side in ("input", "output")
    ]


def _init_grid(runs: Runs, layer: int, name: str) -> np.ndarray:
    """phi of the *initial* ``a`` of r = 8 vs r = 64: what the trained grid is compared against."""
    r8, r64 = (
        an.singular_basis(runs.initial["q,v", r, 0][f"layers_{layer}"][name]["kernel"], "input")
        for r in (8, 64)
    )
    return an.subspace_similarity_grid(r8, r64)


def _drift(runs: Runs, layer: int, name: str) -> float:
    """``||a - a_init|| / ||a_init||`` of the r = 64 run: how far training moved the random ``a``."""
    key = ("q,v", 64, 0)
    a, a0 = (
        _factors(runs, key, layer, name).a,
        runs.initial[key][f"layers_{layer}"][name]["kernel"].a,
    )
    return float(jnp.linalg.norm(a - a0) / jnp.linalg.norm(a0))


def _plot(grids: dict[str, np.ndarray], layer: int, name: str, figures: pathlib.Path) -> None:
    title = f"layer {layer} W_{name[0]}"
    an.plot_subspace_similarity(
        grids["r8_r64"], str(figures / f"phi_r8_r64_{name}.png"),
        title=f"{title}: phi(A_r=8, A_r=64)", ylabel="i (r = 8)", xlabel="j (r = 64)",
    )  # fmt: skip
    an.plot_subspace_similarity(
        grids["seeds"], str(figures / f"phi_seeds_{name}.png"),
        title=f"{title}: two r = 64 seeds", ylabel="i (seed 0)", xlabel="j (seed 1)",
    )  # fmt: skip


def experiment_3(runs: Runs, plot_layer: int, figures: pathlib.Path) -> tuple[str, dict]:
    """phi tables and projections for every layer's q and v; heatmaps for ``plot_layer``."""
    n = runs.spec.d_model
    phi_rows, projection_rows, metrics = [], [], {}
    for layer, name, side in phi_keys(runs):
        g = metrics[layer, name, side] = phi_grids(runs, layer, name, side)
        if side == "input" and layer == plot_layer:
            _plot(g, layer, name, figures)
        drift = _drift(runs, layer, name) if side == "input" else "-"
        phi_rows.append(
            [layer, f"W_{name[0]}", side, g["r8_r64"][0, 0], g["r8_r64"][7, 7], g["seeds"][0, 0],
             g["seeds"][7, 7], g["seeds"][63, 63], float(g["grassmann_seeds_top8"]), drift]
        )  # fmt: skip
    deltas = {rank: jlora.delta(runs.adapters["q,v", rank, 0]) for rank in (4, 64)}
    for layer in range(runs.spec.layers):
        for name in ("query", "value"):
            weight = runs.params[f"layers_{layer}"][name]["kernel"]
            for rank in (4, 64):
                delta = deltas[rank][f"layers_{layer}"][name]["kernel"]
                p = metrics[layer, name, rank] = an.update_projection(weight, delta, rank=rank)
                projection_rows.append(
                    [layer, f"W_{name[0]}", rank, p.onto_delta, p.onto_weight, p.onto_random,
                     p.weight_norm, p.delta_norm, p.amplification]
                )  # fmt: skip
    gaussians = np.random.default_rng(1).normal(size=(2, n, 64))
    an.plot_subspace_similarity(
        an.subspace_similarity_grid(*(np.linalg.svd(g, full_matrices=False)[0] for g in gaussians)),
        str(figures / "phi_random.png"),
        title=f"two random Gaussian {n} x 64 matrices",
    )
    noise = np.linalg.qr(np.random.default_rng(0).normal(size=(n, 16)))[0]
    at_init = np.stack([_init_grid(runs, *key[:2]) for key in phi_keys(runs) if key[2] == "input"])
    chance = (
        f"chance levels: phi (1,1) {random_phi(1, 1, n):.3f}, (8,8) {random_phi(8, 8, n):.3f}, "
        f"(64,64) {random_phi(64, 64, n):.3f}; Grassmann distance of two random 8-dimensional "
        f"subspaces {an.grassmann_distance(noise[:, :8], noise[:, 8:]):.2f}; the untrained `a` of "
        f"r = 8 and r = 64 give at most {at_init[:, 0, 0].max():.3f} at (1,1) and "
        f"{at_init[:, 7, 7].max():.3f} at (8,8)"
    )
    phi_header = ["layer", "weight", "side", "phi r8-r64 (1,1)", "phi r8-r64 (8,8)",
                  "phi seeds (1,1)", "phi seeds (8,8)", "phi seeds (64,64)",
                  "Grassmann seeds top-8", "‖a − a_init‖ / ‖a_init‖"]  # fmt: skip
    projection_header = ["layer", "weight", "r", "‖Uᵀ W V‖ onto ΔW", "onto W", "onto random",
                         "‖W‖", "‖ΔW‖", "amplification"]  # fmt: skip
    text = (
        f"### phi ({chance})\n\n{markdown_table(phi_header, phi_rows)}\n\n"
        f"### Projections\n\n{markdown_table(projection_header, projection_rows)}"
    )
    return text, metrics


def main(argv: list[str] | None = None) -> dict:
    """Runs both experiments, prints their markdown tables and returns the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about a minute: 200 steps, {q, v} at r in 4, 8, 64, one seed",
    )
    parser.add_argument(
        "--figures", default=None, help="where the heatmaps go (default: a temp dir)"
    )
    parser.add_argument("--layer", type=int, default=0, help="the layer whose heatmaps are drawn")
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
    steps = (200, 200) if args.quick else (400, 500)
    runs = Runs(Spec(), pretrain_steps=steps[0], adapt_steps=steps[1], alpha=args.alpha)
    copy = runs.base("copy")
    print(f"base model: copy accuracy {copy['accuracy']:.3f}, exact {copy['exact']:.3f}")
    ranks, targets = ((4, 8, 64), ("q,v",)) if args.quick else (RANKS, tuple(TARGETS))
    seeds = (0,) if args.quick else (0, 1)
    table_2, ablation = experiment_2(runs, ranks, targets, seeds)
    print(
        f"## Experiment 2: copy -> reverse (LoRA alpha {args.alpha:g})\n\n{table_2}\n", flush=True
    )
    if ("q,v", 64, 1) not in runs.adapters:
        runs.lora("q,v", 64, seed=1)
    table_3, subspaces = experiment_3(runs, args.layer, figures)
    print(
        f"## Experiment 3\n\n{table_3}\n\nfigures in {figures}\ndone in {time.perf_counter() - start:.0f}s"
    )
    return {"copy": copy, "ablation": ablation, "subspaces": subspaces, "figures": figures}


if __name__ == "__main__":
    main()
