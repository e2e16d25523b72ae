"""The LoRA paper's Table 5, complete: which weights to adapt at a fixed parameter budget.

The decoder of ``decoder_tasks.py``, pretrained to *copy* (400 steps, as in ``rank_ablation.py``),
is LoRA-adapted to *reverse* with a budget of 4,096 trainable parameters (``2 L d r_total``
with ``L = 2`` layers, ``d = 128``, ``r_total = 8`` summed over the adapted weight types): each
of W_q, W_k, W_v, W_o alone at r = 8, {q, k} and {q, v} at r = 4, and {q, k, v, o} at r = 2,
the paper's pattern (its 18M budget gives r = 8, 4, 2 in the same way).

Rank and step size. jlora's scale is ``alpha / r`` (alpha = 8 fixed, as in the paper), and under
Adam each step moves ``b`` by about the learning rate whatever the gradient's size, so the step
of ``delta W = s a b`` grows with ``s = alpha / r``: at one budget the single weights (r = 8, s =
1) take a quarter of the step of {q, k, v, o} (r = 2, s = 4). To separate the two, every
configuration runs at three peak learning rates, 2.5e-3, 5e-3 and 1e-2, 5 seeds each. Three
slices of that grid are compared: the paper's (lr 5e-3 for all), a matched step (``s * lr`` =
0.01 for all: lr 1e-2 at r = 8, 5e-3 at r = 4, 2.5e-3 at r = 2, so ``b``, which starts at zero,
moves ``delta W`` by the same step in every configuration; ``a`` still moves by about the
learning rate), and with ``--grid`` each configuration at its own best learning rate, chosen on a
validation set (1,024 sequences drawn apart from the test set) and scored on the test set. By
default only the runs the first two slices need are trained (10 per single weight type and for
{q, k, v, o}, 5 for the pairs). The runs of a configuration train side by side under
``jax.vmap`` (``decoder_tasks.fit_many``).

Run: ``python examples/budget_ablation.py --save budget.pkl`` (``--grid``: every learning rate;
``--quick``: 200 steps, 2 seeds, lr 5e-3 only). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import sys
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

NAMES = {"q": "query", "k": "key", "v": "value", "o": "out"}
BUDGET_RANK = 8
"""Total rank over the adapted weight types: r = 8 / (number of weight types)."""
CONFIGS = ("q", "k", "v", "o", "q,k", "q,v", "q,k,v,o")
LRS = (2.5e-3, 5e-3, 1e-2)
ALPHA = 8.0


def rank_of(config: str) -> int:
    """The rank that keeps the budget: 8 for one weight type, 4 for two, 2 for four."""
    return BUDGET_RANK // len(config.split(","))


def train_config(
    runs: Runs, config: str, seeds: tuple[int, ...], lrs: tuple[float, ...], validation: jax.Array
) -> list[dict[str, float]]:
    """Every ``(seed, lr)`` of one configuration, vmapped; test and validation scores of each.

    Seed ``s`` uses the adapter-init key ``100 + s`` and the batch key ``200 + s`` of
    ``Runs.lora``, so the runs at lr 5e-3 are the same runs as there, up to float rounding
    (which 500 steps can amplify; see docs/experiments.md).
    """
    rank = rank_of(config)
    targets = "|".join(NAMES[t] for t in config.split(","))
    lora_config = jlora.LoraConfig(
        targets=rf"layers_\d+/({targets})/kernel", rank=rank, alpha=ALPHA
    )
    model = jlora.linen.lora(runs.model, lora_config)
    members = [(s, lr) for lr in lrs for s in seeds]
    initial = [
        model.init_adapters(jax.random.key(100 + s), runs.params, runs.test[:1]) for s, _ in members
    ]
    trained = fit_many(
        lambda a, p, tokens: answer_loss(model.apply(p, a, tokens), tokens, runs.spec),
        jax.tree.map(lambda *x: jnp.stack(x), *initial),
        runs.params,
        lambda k: make_batch(k, runs.spec, "reverse", BATCH),
        steps=runs.adapt_steps,
        lrs=jnp.array([lr for _, lr in members]),
        keys=jnp.stack([jax.random.key(200 + s) for s, _ in members]),
    )
    apply = jax.jit(model.apply)
    out = []
    for m, (seed, lr) in enumerate(members):
        adapters = jax.tree.map(lambda x: x[m], trained)  # noqa: B023
        trainable = jlora.count_params(runs.params, adapters).trainable
        expected = an.lora_param_count(len(config.split(",")) * runs.spec.layers, 128, rank)
        if trainable != expected:
            raise SystemExit(f"{config}: {trainable:,} trainable parameters, expected {expected:,}")
        test = runs.scores(apply(runs.params, adapters, runs.test))
        val = runs.scores(apply(runs.params, adapters, validation), validation)
        out.append({"seed": seed, "lr": lr, "trainable": trainable, **test,
                    "val_accuracy": val["accuracy"]})  # fmt: skip
    return out


def _cell(values: list[float]) -> str:
    mean, lo, hi = interval(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{max(lo, 0.0):.2f}, {min(hi, 1.0):.2f}]"


def _solved(runs: list[dict]) -> str:
    return f"{sum(r['exact'] >= 0.99 for r in runs)}/{len(runs)}"


def select(results: dict[str, list[dict]], config: str, lr: float) -> list[dict]:
    """The runs of ``config`` at peak learning rate ``lr`` (one per seed)."""
    return [r for r in results[config] if r["lr"] == lr]


def best_lr(results: dict[str, list[dict]], config: str) -> float:
    """The learning rate with the highest mean *validation* token accuracy over the seeds."""
    lrs = sorted({r["lr"] for r in results[config]})
    return max(
        lrs, key=lambda lr: np.mean([r["val_accuracy"] for r in select(results, config, lr)])
    )


def matched_lr(config: str) -> float:
    """The learning rate with ``(alpha / r) * lr = 0.01``: the same step of ``delta W``."""
    return 0.01 * rank_of(config) / ALPHA


def tables(results: dict[str, list[dict]]) -> str:
    """The grid (every learning rate) and the three slices, as markdown."""
    lrs = sorted({r["lr"] for rs in results.values() for r in rs})
    header = ["weights", "r", "trainable params", "scale alpha/r"] + [
        f"lr {lr:g}: token acc. [95% CI], solved" for lr in lrs
    ]
    grid = [
        ["{" + c + "}", rank_of(c), results[c][0]["trainable"], ALPHA / rank_of(c)]
        + [f"{_cell([r['accuracy'] for r in select(results, c, lr)])}, "
           f"{_solved(select(results, c, lr))}" if select(results, c, lr) else "-" for lr in lrs]
        for c in results
    ]  # fmt: skip
    slices = []
    for c in results:
        row = ["{" + c + "}", rank_of(c)]
        swept = len({r["lr"] for r in results[c]}) == len(LRS)
        for lr in (5e-3, matched_lr(c), best_lr(results, c) if swept else None):
            chosen = select(results, c, lr)
            if not chosen:
                row += ["-", "-"]
                continue
            row += [f"{lr:g}: {_cell([r['accuracy'] for r in chosen])}",
                    f"{_cell([r['exact'] for r in chosen])}, {_solved(chosen)}"]  # fmt: skip
        slices.append(row)
    slice_header = ["weights", "r", "paper's (lr 5e-3): token acc.", "exact, solved",
                    "matched step (s lr = 0.01): token acc.", "exact, solved",
                    "best lr (validation; --grid): token acc.", "exact, solved"]  # fmt: skip
    if not any(len({r["lr"] for r in rs}) == len(LRS) for rs in results.values()):
        slice_header, slices = slice_header[:-2], [row[:-2] for row in slices]
    return (
        f"### Every learning rate\n\n{markdown_table(header, grid)}\n\n"
        f"### Three slices\n\n{markdown_table(slice_header, slices)}"
    )


def main(argv: list[str] | None = None) -> dict:
    """Runs every configuration at every learning rate; prints the tables, returns the scores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 steps, 2 seeds, lr 5e-3 only")
    parser.add_argument("--seeds", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument("--save", default=None, help="pickle the per-run scores here")
    parser.add_argument("--grid", action="store_true", help="every learning rate of LRS")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS,
                        help="a subset, e.g. to run two processes (default: all)")  # fmt: skip
    parser.add_argument("--only", choices=("paper", "others"), default=None,
                        help="only lr 5e-3, or only the other learning rates (default: both)")
    parser.add_argument("--load", nargs="+", default=None,
                        help="print the tables of --save pickles (merged; trusted files only)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.load:
        results, base = {}, None
        for path in args.load:
            with open(path, "rb") as f:
                saved = pickle.load(f)
            for config, trained in saved["results"].items():
                results[config] = results.get(config, []) + trained
            base = saved["base"]
        results = {c: results[c] for c in CONFIGS if c in results}
        text = tables(results)
        print(f"frozen base: token accuracy {base['accuracy']:.3f}\n\n{text}")
        return {"results": results, "base": base, "text": text}
    steps = (200, 200) if args.quick else (400, 500)
    runs = Runs(Spec(), pretrain_steps=steps[0], adapt_steps=steps[1], alpha=ALPHA)
    validation = make_batch(jax.random.key(54321), runs.spec, "reverse", 1024)
    seeds = tuple(range(args.seeds or (2 if args.quick else 5)))
    results, base = {}, runs.base()
    # The paper's slice first for every configuration, then the other learning rates: an
    # interrupted run still has a complete first slice (the pickle is rewritten after each).
    passes = {None: (True, False), "paper": (True,), "others": (False,)}[args.only]
    for first in passes:
        for config in args.configs:
            if args.quick:
                lrs = (5e-3,) if first else ()
            else:
                every = LRS if args.grid else sorted({5e-3, matched_lr(config)})
                lrs = (5e-3,) if first else tuple(lr for lr in every if lr != 5e-3)
            if not lrs:
                continue
            trained = train_config(runs, config, seeds, lrs, validation)
            results[config] = results.get(config, []) + trained
            print(f"{config} at {lrs}: {time.perf_counter() - start:.0f}s", flush=True)
            if args.save:
                with open(args.save, "wb") as f:
                    pickle.dump({"results": results, "base": base}, f)
    text = tables(results)
    print(f"frozen base: token accuracy {base['accuracy']:.3f}\n\n{text}")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return {"results": results, "base": base, "text": text}


if __name__ == "__main__":
    main()
