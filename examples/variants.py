"""LoRA's variants against plain LoRA, GaLore against Adam, ReLoRA's rank growth (issue 16).

Experiment A: each variant of ``jlora.variants`` against plain LoRA at equal trainable parameters
on two adaptation tasks: the copy -> reverse decoder of ``decoder_tasks.py`` at ``d_model`` 64
({q, v} of both layers) and digits 0-4 -> 5-9 (the MLP of ``digits.py``, both hidden layers).
Methods: LoRA, rsLoRA, DoRA (at the ranks just below and above LoRA's parameter count: its
magnitudes count), PiSSA and OLoRA inits, LoRA-FA at equal rank and at equal parameters (``a``
frozen), AdaLoRA budgeted to LoRA's total rank. Each method's learning rate is the best of a
small sweep on a separate sweep seed, scored on a validation set; then 5 evaluation seeds
(paired: the same batches per seed for every method).

Experiment B: GaLore (Adam inside) against full Adam, training a digits MLP from scratch: test
accuracy and loss, and optimizer-state bytes (``state_bytes``) at two ranks.

Experiment C: ReLoRA ({q, v}, rank 4, a merge and reset every 75 of 300 steps) against plain LoRA
at the same rank and steps and a full fine-tune, on the decoder task: the singular spectrum of the
total update ``W - W0`` after each restart, and its subspace similarity (``jlora.analysis``) to
the full fine-tune's update.

DoRA and AdaLoRA are not in ``jlora.linen`` yet, so their loss forms the effective weights
(``dora_merge``; ``merge`` of ``adalora_to_lora``) inside the jitted loss and calls the plain
model: the gradients equal the factored layer's, the step is only slower.

Run: ``python examples/variants.py --figures docs/figures`` (``--parts`` picks experiments; at
load 15-34 on 2 cores the decoder part took 31 min, digits 7, GaLore 23); ``--quick`` for a smoke
run (a smaller budget, 2 seeds, no sweep). Prints markdown tables.

The training loop and the tasks are in ``variants_tasks.py``, the methods and experiment A in
``variants_methods.py``, experiment C in ``variants_relora.py``; this script runs B and them.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.linen
import jlora.variants as jv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from rank_ablation import markdown_table
from variants_methods import experiment_a, fmt, table_a
from variants_relora import captured, experiment_c, figure_c, numerical_rank, table_c
from variants_tasks import (
    MLP,
    adam_tx,
    class_scores,
    decoder_task,
    digits_split,
    digits_task,
    sampler,
    schedule_for,
    size,
    train,
    xent,
)

__all__ = ["adam_tx", "captured", "main", "numerical_rank", "schedule_for", "train"]

# ----------------------------------------------------------------------------------------------
# Experiment B: GaLore against Adam, from scratch.


def experiment_b(
    seeds, sweep_seeds, *, steps: int, hidden: int, ranks: tuple[int, ...], lrs: tuple[float, ...]
) -> dict:
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = digits_split()
    model = MLP(hidden=hidden)
    make = sampler(x_tr, y_tr)
    val, test = (jnp.asarray(x_va), jnp.asarray(y_va)), (jnp.asarray(x_te), jnp.asarray(y_te))
    gap = max(1, steps // 20)

    def tx_for(name: str) -> optax.GradientTransformation:
        sched = schedule_for(1.0, steps)
        if name == "Adam":
            return adam_tx(sched)
        rank = int(name.split("r=")[1])
        return optax.chain(
            optax.clip_by_global_norm(1.0), jv.galore(optax.adam(sched), rank, update_proj_gap=gap)
        )

    names = ["Adam", *[f"GaLore r={r}" for r in ranks]]
    out = {}
    params0 = model.init(jax.random.key(0), x_tr[:1])["params"]
    loss = lambda p, _, b: xent(model.apply({"params": p}, b[0]), b)  # noqa: E731

    def one(name, lr, seed):
        params = model.init(jax.random.key(300 + seed), x_tr[:1])["params"]
        params, _ = train(loss, params, None, make, tx_for(name), steps=steps, lr=lr,
                          key=jax.random.key(400 + seed), cache=("galore", name))  # fmt: skip
        return params

    for name in names:
        sweep = {}
        for lr in lrs if sweep_seeds else ():
            ps = [one(name, lr, s) for s in sweep_seeds]
            losses = [class_scores(model.apply({"params": p}, val[0]), val)["loss"] for p in ps]
            sweep[lr] = float(np.mean(losses))
        lr = min(sweep, key=sweep.get) if sweep else 1e-2
        test_logits = [model.apply({"params": one(name, lr, s)}, test[0]) for s in seeds]
        runs = [class_scores(logits, test) for logits in test_logits]
        state = tx_for(name).init(params0)
        out[name] = {"lr": lr, "sweep": sweep, "runs": runs, "state_bytes": jv.state_bytes(state)}
        print(f"  GaLore/Adam {name}: lr {lr:g}, {time.strftime('%H:%M:%S')}", flush=True)
    out["_params"] = size(params0)
    out["_shapes"] = {p: np.shape(w) for p, w in jlora._paths.leaves_with_paths(params0)}
    return out


def table_b(results: dict) -> str:
    adam = results["Adam"]
    header = ["optimizer", "lr (sweep: val. loss)", "test accuracy [95% CI]",
              "paired diff. vs Adam [95% CI]", "test loss [95% CI]", "optimizer state (bytes)",
              "state / Adam's"]  # fmt: skip
    rows = []
    base = [r["score"] for r in adam["runs"]]
    for name, res in results.items():
        if name.startswith("_"):
            continue
        acc = [r["score"] for r in res["runs"]]
        sweep = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in res["sweep"].items())
        rows.append([name, f"{res['lr']:g} ({sweep})" if sweep else f"{res['lr']:g}", fmt(acc),
                     "-" if name == "Adam" else fmt(list(np.subtract(acc, base)), clip=None),
                     fmt([r["loss"] for r in res["runs"]], clip=(0, np.inf)),
                     f"{res['state_bytes']:,}",
                     f"{res['state_bytes'] / adam['state_bytes']:.3f}"])  # fmt: skip
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------------------------


def print_adalora(results: dict) -> None:
    for name, res in results.items():
        if name.startswith("AdaLoRA"):
            ranks = [" ".join(f"{p.split('/')[-2]}{p[7] if p.startswith('layers') else ''}:{r}"
                              for p, r in i["ranks"].items()) for i in res["infos"]]  # fmt: skip
            print(f"\n{name}: final ranks per seed: " + "; ".join(ranks))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 2 seeds, no lr sweep")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sweep-seeds", type=int, default=1, help="seeds per lr of each sweep")
    parser.add_argument("--steps", type=int, default=300, help="decoder adaptation steps")
    parser.add_argument("--galore-lrs", default="3e-3,1e-2,3e-2,1e-1", help="the GaLore/Adam sweep")
    parser.add_argument("--galore-ranks", default="8,32")
    parser.add_argument("--figures", default=None, help="directory for the ReLoRA spectrum figure")
    parser.add_argument("--parts", default="dgbc", help="d: decoder variants, g: digits variants, "
                        "b: GaLore vs Adam, c: ReLoRA (needs d)")  # fmt: skip
    args = parser.parse_args(argv)
    start = time.perf_counter()
    quick = args.quick
    seeds = tuple(range(2 if quick else args.seeds))
    sweep_seeds = () if quick else tuple(range(1000, 1000 + args.sweep_seeds))
    results: dict[str, Any] = {}
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; seeds {seeds}, sweep {sweep_seeds}")
    if "d" in args.parts or "c" in args.parts:
        dec = decoder_task(steps=100 if quick else args.steps, pretrain=200 if quick else 300,
                           d_model=64)  # fmt: skip
        base = dec.scores(dec.model.apply({"params": dec.params}, dec.test), dec.test)
        results["decoder_base"] = base
        print(f"decoder base on reverse: {base}")
        dec_results = experiment_a(dec, seeds, sweep_seeds)
        results["decoder"] = dec_results
        print("\n### Decoder, copy -> reverse, {q, v}\n")
        print(table_a(dec, dec_results, baseline=f"LoRA r={dec.rank}"))
        print_adalora(dec_results)
    if "g" in args.parts:
        dig = digits_task(steps=200 if quick else 400, pretrain=400 if quick else 800)
        base = dig.scores(dig.model.apply({"params": dig.params}, dig.test[0]), dig.test)
        results["digits_base"] = base
        print(f"\ndigits base on 5-9: {base}")
        dig_results = experiment_a(dig, seeds, sweep_seeds)
        results["digits"] = dig_results
        print("\n### Digits 0-4 -> 5-9, both hidden layers\n")
        print(table_a(dig, dig_results, baseline=f"LoRA r={dig.rank}"))
        print_adalora(dig_results)
    if "b" in args.parts:
        hidden = 128 if quick else 256
        res_b = experiment_b(seeds, sweep_seeds, steps=200 if quick else 600, hidden=hidden,
                             ranks=tuple(int(r) for r in args.galore_ranks.split(",")),
                             lrs=tuple(float(x) for x in args.galore_lrs.split(",")))  # fmt: skip
        results["galore"] = res_b
        print(f"\n### GaLore vs Adam, digits MLP 64-{hidden}-{hidden}-10 from scratch "
              f"({res_b['_params']:,} params)\n")  # fmt: skip
        print(table_b(res_b))
    if "c" in args.parts:
        lora_name = f"LoRA r={dec.rank}"
        res_c = experiment_c(dec, seeds, dec_results[lora_name]["lr"],
                             dec_results[lora_name]["trained"], every=dec.steps // 4,
                             full_lr=1e-3)  # fmt: skip
        results["relora"] = res_c
        ranks, sims = table_c(dec, res_c)
        print("\n### ReLoRA: rank (sigma_i > 1e-3 sigma_1) of W - W0, min-max over seeds\n")
        print(ranks)
        print("\n### ReLoRA vs LoRA: the total update against the full fine-tune's\n")
        print(sims)
        header = ["method", "token accuracy [95% CI]", "exact match [95% CI]", "test loss [95% CI]"]
        rows = [[n, fmt([r["score"] for r in v]), fmt([r["exact"] for r in v]),
                 fmt([r["loss"] for r in v], clip=(0, np.inf))]
                for n, v in res_c["scores"].items()]  # fmt: skip
        pairs = zip(res_c["scores"]["ReLoRA"], res_c["scores"]["LoRA"], strict=True)
        d = [a["score"] - b["score"] for a, b in pairs]
        print()
        print(markdown_table(header, rows))
        print(f"\nReLoRA - LoRA token accuracy, paired: {fmt(d, clip=None)}")
        if args.figures:
            figure_c(dec, res_c, pathlib.Path(args.figures) / "relora_spectrum.png")
    print(f"\ndone in {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
