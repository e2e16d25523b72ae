"""QLoRA quality: LoRA over an NF4, int8, bfloat16 or float32 frozen base (issue 15).

Two transfer tasks, each pretrained in float32, then frozen and LoRA-adapted over five stores of
the same pretrained weights, with the same adapter init, batches and steps:

- **copy -> reverse** (``decoder_tasks.py``): the decoder (2 layers, ``d_model`` 128) is pretrained
  to copy 8 random symbols and adapted to reverse them; scored by token accuracy and exact match on
  1,024 held-out sequences under teacher forcing.
- **digits 0-4 -> 5-9** (``digits.py``'s MLP ``64 -> 128 -> 128 -> 10``): pretrained on digits 0-4,
  adapted to 5-9; scored by test accuracy on digits 5-9.

The stores differ only in the frozen kernels that QLoRA quantises (the decoder's
``query/key/value/out/up/down``; the MLP's two hidden layers; the heads, embeddings, positions,
biases and norms stay float32 in every store; the MLP head is 128 x 10, not a multiple of NF4's
block of 64): ``float32`` (as pretrained), ``bfloat16`` (rounded), ``nf4`` (NF4, blocks of 64,
double-quantised absmax; ``jlora.quant.quantize``), ``int8`` (per-output-channel absmax) and the
control ``nf4 as float32`` (NF4's values in plain float32 kernels). The computation is float32 in
every case (a bfloat16 kernel is promoted; a quantised one goes through
``jlora.quant.quantized_matmul``), so what differs is the frozen weight's rounding alone, and the
control separates NF4's rounding from the quantised code path.

A seed ``s`` draws the pretraining (init and batches: one pretrained base per seed), the adapter
init and the adaptation batches; every store of seed ``s`` starts from the same adapters. Reported:
the mean and 95% t-interval over seeds of each store's final metric, and of the paired per-seed
differences of :data:`PAIRS` (the issue's claim: NF4 within 1 point of the bfloat16-base LoRA).

Run: ``python examples/qlora_quality.py [--seeds 5] [--quick] [--tasks reverse --adapt-steps 200]``.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.linen
import jlora.quant as jq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decoder_tasks import Decoder, Spec, answer_loss, answer_scores, make_batch
from rank_ablation import interval, markdown_table

STORES = ("float32", "bfloat16", "nf4", "int8", "nf4 as float32")
PAIRS = (("nf4", "bfloat16"), ("int8", "bfloat16"), ("float32", "bfloat16"),
         ("nf4", "nf4 as float32"))  # fmt: skip
DECODER_FROZEN = r"layers_\d+/(query|key|value|out|up|down)/kernel"
MLP_FROZEN = r"hidden_\d+/kernel"


def store(params: dict, frozen: str, kind: str) -> dict:
    """``params`` with the kernels matching ``frozen`` stored as ``kind`` (of :data:`STORES`)."""
    if kind == "float32":
        return params
    if kind in ("nf4", "int8"):
        return jq.quantize(params, frozen, kind=kind)
    if kind == "nf4 as float32":  # NF4's values in plain float32 kernels: the code-path control
        return jq.dequantize(jq.quantize(params, frozen, kind="nf4"))

    def leaf(path, w):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return w.astype(jnp.bfloat16) if re.fullmatch(frozen, name) else w

    return jax.tree_util.tree_map_with_path(leaf, params)


def frozen_fraction(params: dict, frozen: str) -> float:
    """Fraction of the base's parameters that the stores change."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in flat]
    sizes = [w.size for _, w in flat]
    chosen = sum(s for n, s in zip(names, sizes, strict=True) if re.fullmatch(frozen, n))
    return chosen / sum(sizes)


# --------------------------------------------------------------------------- copy -> reverse


def trainer(loss, make, *, steps: int, lr: float, chunk: int = 100):
    """``decoder_tasks.fit``'s training, compiled once per tree structure, not once per call.

    The same warm-up and cosine schedule, clipping, Adam, and batches per key:
    ``train(trainable, frozen, key)`` returns the trained ``trainable``.
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

    @jax.jit
    def run(trainable, opt_state, frozen, key):
        def step(carry, k):
            trainable, opt_state = carry
            grads = jax.grad(loss)(trainable, frozen, make(k))
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), None

        (trainable, opt_state), _ = jax.lax.scan(
            step, (trainable, opt_state), jax.random.split(key, chunk)
        )
        return trainable, opt_state

    def train(trainable, frozen, key):
        opt_state = tx.init(trainable)
        for _ in range(chunk, steps + 1, chunk):
            key, sub = jax.random.split(key)
            trainable, opt_state = run(trainable, opt_state, frozen, sub)
        return trainable

    return train


class ReverseTask:
    """Pretrain copy (float32) per seed; adapt to reverse over each store of that base."""

    def __init__(self, *, pretrain_steps: int, adapt_steps: int, rank: int, alpha: float):
        spec = self.spec = Spec()
        model = self.model = Decoder(spec)
        self.test = make_batch(jax.random.key(12345), spec, "reverse", 1024)
        self.copy_test = make_batch(jax.random.key(12345), spec, "copy", 1024)
        self.config = jlora.LoraConfig(targets=DECODER_FROZEN, rank=rank, alpha=alpha)
        lora = self.lora = jlora.linen.lora(model, self.config)
        self.pretrain_steps, self.adapt_steps = pretrain_steps, adapt_steps
        self.pretrain = trainer(
            lambda p, _, t: answer_loss(model.apply({"params": p}, t), t, spec),
            lambda k: make_batch(k, spec, "copy", 32),
            steps=pretrain_steps,
            lr=3e-3,
        )
        self.adapt = trainer(
            lambda a, p, t: answer_loss(lora.apply(p, a, t), t, spec),
            lambda k: make_batch(k, spec, "reverse", 32),
            steps=adapt_steps,
            lr=5e-3,
        )

    def run(self, seed: int) -> dict[str, dict[str, float]]:
        """``{store: {"copy": base copy accuracy, "accuracy", "exact", "loss"}}`` for one seed."""
        spec, lora = self.spec, self.lora
        params = self.model.init(jax.random.key(seed), self.test[:1])["params"]
        params = self.pretrain(params, None, jax.random.key(1000 + seed))
        initial = lora.init_adapters(jax.random.key(2000 + seed), params, self.test[:1])
        out = {}
        for kind in STORES:
            start = time.perf_counter()
            base = store(params, DECODER_FROZEN, kind)
            copy_logits = self.model.apply({"params": jq.dequantize(base)}, self.copy_test)
            adapters = self.adapt(initial, base, jax.random.key(3000 + seed))
            logits = lora.apply(base, adapters, self.test)
            accuracy, exact = answer_scores(logits, self.test, spec)
            out[kind] = {
                "copy": answer_scores(copy_logits, self.copy_test, spec)[0],
                "accuracy": accuracy,
                "exact": exact,
                "loss": float(answer_loss(logits, self.test, spec)),
                "seconds": time.perf_counter() - start,
            }
        return out


# --------------------------------------------------------------------------- digits


class DigitsTask:
    """Pretrain the digits MLP on 0-4 (float32) per seed; adapt to 5-9 over each store."""

    def __init__(self, *, epochs: int, rank: int, alpha: float):
        import digits  # examples/digits.py: the MLP, its loss, accuracy and batches
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        self.digits, self.epochs = digits, epochs
        data = load_digits()
        x, y = (data.data / 16.0).astype(np.float32), data.target
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
        self.old = jnp.asarray(x_tr[y_tr < 5]), jnp.asarray(y_tr[y_tr < 5])
        self.new = jnp.asarray(x_tr[y_tr >= 5]), jnp.asarray(y_tr[y_tr >= 5])
        self.new_test = jnp.asarray(x_te[y_te >= 5]), jnp.asarray(y_te[y_te >= 5])
        self.old_test = jnp.asarray(x_te[y_te < 5]), jnp.asarray(y_te[y_te < 5])
        self.config = jlora.LoraConfig(targets=r".*/kernel", rank=rank, alpha=alpha)
        lora = self.lora = jlora.linen.lora(digits.MODEL, self.config)
        self.pretrain = epoch_trainer(
            lambda p, _, xb, yb: digits.loss_fn(p, xb, yb), digits.batches, epochs=epochs, lr=3e-3
        )
        self.adapt = epoch_trainer(
            lambda a, p, xb, yb: digits.loss_fn(p, xb, yb, a, lora),
            digits.batches,
            epochs=epochs,
            lr=1e-2,
        )

    def run(self, seed: int) -> dict[str, dict[str, float]]:
        """``{store: {"old": base accuracy on 0-4, "accuracy", "loss" on 5-9}}`` for one seed."""
        d, lora = self.digits, self.lora
        params = d.MODEL.init(jax.random.key(seed), self.old[0][:1])["params"]
        params = self.pretrain(params, None, self.old, 1000 + seed)
        initial = lora.init_adapters(jax.random.key(2000 + seed), params, self.old[0][:1])
        out = {}
        for kind in STORES:
            start = time.perf_counter()
            base = store(params, MLP_FROZEN, kind)
            adapters = self.adapt(initial, base, self.new, 3000 + seed)
            out[kind] = {
                "old": d.accuracy(jq.dequantize(base), *self.old_test),
                "accuracy": d.accuracy(base, *self.new_test, adapters, lora),
                "loss": float(d.loss_fn(base, *self.new_test, adapters, lora)),
                "seconds": time.perf_counter() - start,
            }
        return out


def epoch_trainer(loss, batches, *, epochs: int, lr: float, batch_size: int = 64):
    """``digits.train``'s loop (Adam, the same batches per seed), its step compiled once.

    ``train(trainable, frozen, (x, y), seed)`` returns the trained ``trainable``.
    """
    tx = optax.adam(lr)

    @jax.jit
    def step(trainable, opt_state, frozen, xb, yb):
        grads = jax.grad(loss)(trainable, frozen, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    def train(trainable, frozen, data, seed):
        (x, y), opt_state, key = data, tx.init(trainable), jax.random.key(seed)
        for _ in range(epochs):
            key, sub = jax.random.split(key)
            for idx in batches(sub, len(x), batch_size):
                trainable, opt_state = step(trainable, opt_state, frozen, x[idx], y[idx])
        return trainable

    return train


# --------------------------------------------------------------------------- tables


# (scale, decimals, bounds): accuracies in points, within [0, 100]; losses as they are, >= 0
POINTS, PLAIN = (100.0, 1, (0.0, 100.0)), (1.0, 3, (0.0, np.inf))
DIFFERENCE = {POINTS: (100.0, 1, None), PLAIN: (1.0, 3, None)}


def cell(
    values: list[float],
    scale: float = 100.0,
    decimals: int = 1,
    bounds: tuple[float, float] | None = None,
) -> str:
    """``mean [95% t-interval] (min to max)`` of per-seed values times ``scale``.

    The interval is clipped to ``bounds`` (a score's range) when given.
    """
    mean, lo, hi = (scale * v for v in interval(values))
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    f = f"{{:.{decimals}f}}".format
    if len(values) < 2:
        return f(mean)
    v = [scale * x for x in values]
    return f"{f(mean)} [{f(lo)}, {f(hi)}] ({f(min(v))} to {f(max(v))})"


Metrics = dict[str, tuple[str, tuple[float, int]]]  # key: (column name, (scale, decimals))


def table(runs: list[dict[str, dict[str, float]]], metrics: Metrics) -> str:
    """One row per store: each metric's mean, 95% t-interval and range over seeds."""
    header = ["base store", *(name for name, _ in metrics.values())]
    rows = [[kind, *(cell([r[kind][m] for r in runs], *f) for m, (_, f) in metrics.items())]
            for kind in STORES]  # fmt: skip
    return markdown_table(header, rows)


def paired_table(runs: list[dict[str, dict[str, float]]], metrics: Metrics) -> str:
    """One row per pair of :data:`PAIRS`: the per-seed difference, over seeds."""
    header = ["paired difference", *(name for name, _ in metrics.values())]
    rows = []
    for kind, ref in PAIRS:
        diffs = {m: [r[kind][m] - r[ref][m] for r in runs] for m in metrics}
        rows.append(
            [f"{kind} - {ref}", *(cell(diffs[m], *DIFFERENCE[f]) for m, (_, f) in metrics.items())]
        )
    return markdown_table(header, rows)


def verdict(runs: list[dict[str, dict[str, float]]], metric: str, margin: float = 0.01) -> str:
    """Whether each quantised store's paired difference to bfloat16 is resolved above -margin."""
    words = []
    for kind in ("nf4", "int8"):
        mean, lo, hi = interval([r[kind][metric] - r["bfloat16"][metric] for r in runs])
        if lo >= -margin:
            state = f"within {100 * margin:g} point: interval above -{100 * margin:g}"
        elif hi < -margin:
            state = f"more than {100 * margin:g} point below: interval below -{100 * margin:g}"
        else:
            state = "not resolved at this scale"
        words.append(
            f"{kind} - bfloat16 {100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] ({state})"
        )
    return "; ".join(words)


def _report(name: str, runs: list, metrics: Metrics, verdicts: dict[str, str]) -> None:
    print(table(runs, metrics), "", paired_table(runs, metrics), sep="\n")
    for key, label in verdicts.items():
        print(f"{name}, {label}: {verdict(runs, key)}")
    print(flush=True)


def _seconds(runs: list) -> str:
    return ", ".join(f"{k} {np.median([r[k]['seconds'] for r in runs]):.0f}s" for k in STORES)


def main(argv: list[str] | None = None) -> dict:
    """Runs the tasks, prints their tables; returns ``{task: [per-seed {store: metrics}]}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="default 5 (--quick: 2)")
    parser.add_argument("--quick", action="store_true", help="shorter runs, for the slow test")
    parser.add_argument("--tasks", default="reverse,digits", help="comma-separated")
    parser.add_argument(
        "--adapt-steps", type=int, default=None, help="reverse's (default 500; --quick: 300)"
    )
    args = parser.parse_args(argv)
    seeds = args.seeds or (2 if args.quick else 5)
    start = time.perf_counter()
    results: dict = {}
    tasks = args.tasks.split(",")
    if "reverse" in tasks:
        task = ReverseTask(
            pretrain_steps=200 if args.quick else 400,
            adapt_steps=args.adapt_steps or (300 if args.quick else 500),
            rank=8,
            alpha=16.0,
        )
        p0 = task.model.init(jax.random.key(0), task.test[:1])["params"]
        print(
            f"copy -> reverse: decoder d_model {task.spec.d_model}, {task.spec.layers} layers; "
            f"LoRA r=8, alpha 16 on {DECODER_FROZEN} (the stored kernels, "
            f"{frozen_fraction(p0, DECODER_FROZEN):.0%} of the base's parameters); "
            f"{task.pretrain_steps} pretraining + {task.adapt_steps} adaptation steps, "
            f"{seeds} seeds",
            flush=True,
        )
        runs = results["reverse"] = []
        for seed in range(seeds):
            runs.append(task.run(seed))
            scores = {k: round(v["accuracy"], 4) for k, v in runs[-1].items()}
            print(f"  seed {seed}: token accuracy {scores} ({time.perf_counter() - start:.0f}s)")
        print(f"adaptation time per run (median; first includes compiling): {_seconds(runs)}")
        metrics = {"copy": ("frozen base: copy token acc.", POINTS),
                   "accuracy": ("reverse token acc.", POINTS),
                   "exact": ("reverse exact match", POINTS),
                   "loss": ("reverse test loss", PLAIN)}  # fmt: skip
        verdicts = {"accuracy": "token accuracy", "exact": "exact match"}
        _report("copy -> reverse", runs, metrics, verdicts)
    if "digits" in tasks:
        epochs = 20 if args.quick else 40
        task = DigitsTask(epochs=epochs, rank=4, alpha=8.0)
        p0 = task.digits.MODEL.init(jax.random.key(0), task.old[0][:1])["params"]
        print(
            f"digits 0-4 -> 5-9: MLP 64-128-128-10; LoRA r=4, alpha 8 on every kernel; stored "
            f"kernels {MLP_FROZEN} ({frozen_fraction(p0, MLP_FROZEN):.0%} of the base's "
            f"parameters); {epochs} epochs each, {seeds} seeds; {len(task.new_test[1])} test "
            "images of 5-9",
            flush=True,
        )
        runs = results["digits"] = []
        for seed in range(seeds):
            runs.append(task.run(seed))
            scores = {k: round(v["accuracy"], 4) for k, v in runs[-1].items()}
            print(f"  seed {seed}: accuracy on 5-9 {scores} ({time.perf_counter() - start:.0f}s)")
        metrics = {"old": ("frozen base: acc. on 0-4", POINTS),
                   "accuracy": ("adapted: acc. on 5-9", POINTS),
                   "loss": ("adapted: test loss on 5-9", PLAIN)}  # fmt: skip
        _report("digits", runs, metrics, {"accuracy": "accuracy on 5-9"})
    print(f"done in {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):  # bfloat16 kernels meet float32 activations
        main()
