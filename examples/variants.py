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
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jlora
import jlora.analysis as an
import jlora.linen
import jlora.variants as jv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decoder_tasks import Decoder, Spec, answer_loss, answer_scores, make_batch
from rank_ablation import interval, markdown_table

# ----------------------------------------------------------------------------------------------
# Training loop: Adam (or any optax transform) with warm-up + cosine decay, clipping, scan chunks.


def schedule_for(lr: float, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)


def adam_tx(lr: float | optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


_COMPILED: dict[Any, Callable] = {}
"""Jitted chunks by ``cache``: one compilation serves all seeds and learning rates of a method."""


def train(
    loss: Callable,
    trainable: Any,
    frozen: Any,
    make: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    *,
    steps: int,
    key: jax.Array,
    lr: float = 1.0,
    chunk: int = 100,
    post: Callable | None = None,
    post_state: Any = None,
    between: Callable | None = None,
    cache: Any = None,
) -> tuple[Any, Any]:
    """``steps`` steps of ``tx`` (its schedule peaking at 1) times ``lr``, on fresh batches.

    ``lr`` multiplies the updates (a traced argument, so runs that share ``cache`` share one
    compilation; for Adam that equals a schedule peaking at ``lr``). Batches are ``make(k)``,
    ``chunk`` steps per ``lax.scan``. ``post(t, trainable, grads, post_state) -> (trainable,
    post_state)`` runs inside the step after the update (AdaLoRA's importance and masking).
    ``between(done, trainable, frozen, opt_state) -> (trainable, frozen, opt_state)`` runs between
    chunks, outside jit (ReLoRA's restarts).
    """
    opt_state = tx.init(trainable)

    def run(trainable, opt_state, post_state, frozen, t0, key, lr):
        def step(carry, inputs):
            trainable, opt_state, post_state = carry
            t, k = inputs
            grads = jax.grad(loss)(trainable, frozen, make(k))
            updates, opt_state = tx.update(grads, opt_state, trainable)
            updates = jax.tree.map(lambda u: lr * u, updates)
            trainable = optax.apply_updates(trainable, updates)
            if post is not None:
                trainable, post_state = post(t, trainable, grads, post_state)
            return (trainable, opt_state, post_state), None

        ts = t0 + jnp.arange(chunk)
        carry, _ = jax.lax.scan(
            step, (trainable, opt_state, post_state), (ts, jax.random.split(key, chunk))
        )
        return carry

    if cache is None:
        compiled = jax.jit(run)
    else:
        compiled = _COMPILED.setdefault((cache, steps, chunk), jax.jit(run))
    lr = jnp.float32(lr)
    for done in range(chunk, steps + 1, chunk):
        key, sub = jax.random.split(key)
        trainable, opt_state, post_state = compiled(
            trainable, opt_state, post_state, frozen, done - chunk, sub, lr
        )
        if between is not None and done < steps:
            trainable, frozen, opt_state = between(done, trainable, frozen, opt_state)
    return trainable, frozen


def size(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Tasks: a frozen base, what to adapt, a batch maker, validation and test scores.


@dataclasses.dataclass
class Task:
    name: str
    model: nn.Module
    params: Any
    targets: str
    rank: int  # plain LoRA's rank; every other method is matched to its trainable count
    sample: Any
    make: Callable[[jax.Array], Any]
    loss: Callable[[jax.Array, Any], jax.Array]  # (logits, batch) -> scalar
    val: Any
    test: Any
    scores: Callable[[jax.Array, Any], dict]
    steps: int
    lrs: tuple[float, ...]
    weights: tuple[str, ...] = ()  # the adapted kernels' paths
    quick_lr: float = 1e-2  # --quick skips the sweep


def decoder_task(steps: int, pretrain: int, d_model: int = 128) -> Task:
    spec = Spec(d_model=d_model)
    model = Decoder(spec)
    test = make_batch(jax.random.key(12345), spec, "reverse", 1024)
    val = make_batch(jax.random.key(777), spec, "reverse", 512)
    params = model.init(jax.random.key(0), test[:1])["params"]
    loss = lambda logits, tokens: answer_loss(logits, tokens, spec)  # noqa: E731
    params, _ = train(
        lambda p, _, tokens: loss(model.apply({"params": p}, tokens), tokens),
        params,
        None,
        lambda k: make_batch(k, spec, "copy", 32),
        adam_tx(schedule_for(3e-3, pretrain)),
        steps=pretrain,
        key=jax.random.key(1),
    )

    def scores(logits, tokens):
        accuracy, exact = answer_scores(logits, tokens, spec)
        return {"score": accuracy, "exact": exact, "loss": float(loss(logits, tokens))}

    return Task(
        "decoder", model, params, r"layers_\d+/(query|value)/kernel", 4, test[:1],
        lambda k: make_batch(k, spec, "reverse", 32), loss, val, test, scores, steps,
        (2e-3, 5e-3, 1.25e-2, 3.125e-2),
        tuple(f"layers_{i}/{n}/kernel" for i in range(spec.layers) for n in ("query", "value")),
        1.25e-2,
    )  # fmt: skip


class MLP(nn.Module):
    hidden: int = 128
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden, name="hidden_0")(x))
        x = nn.relu(nn.Dense(self.hidden, name="hidden_1")(x))
        return nn.Dense(self.classes, name="head")(x)


def digits_split(seed: int = 0):
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_tr, y_tr, test_size=0.2, random_state=seed, stratify=y_tr
    )
    return (x_tr, y_tr), (x_va, y_va), (x_te, y_te)


def sampler(x: np.ndarray, y: np.ndarray, batch: int = 32) -> Callable:
    x, y = jnp.asarray(x), jnp.asarray(y)
    return lambda k: (lambda i: (x[i], y[i]))(jax.random.randint(k, (batch,), 0, len(x)))


def xent(logits: jax.Array, batch: Any) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def class_scores(logits: jax.Array, batch: Any) -> dict:
    right = jnp.argmax(logits, -1) == batch[1]
    return {"score": float(jnp.mean(right)), "loss": float(xent(logits, batch))}


def digits_task(steps: int, pretrain: int) -> Task:
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = digits_split()
    model = MLP()
    params = model.init(jax.random.key(0), x_tr[:1])["params"]
    old = y_tr < 5
    params, _ = train(
        lambda p, _, b: xent(model.apply({"params": p}, b[0]), b),
        params,
        None,
        sampler(x_tr[old], y_tr[old]),
        adam_tx(schedule_for(3e-3, pretrain)),
        steps=pretrain,
        key=jax.random.key(1),
    )
    new = lambda x, y: (jnp.asarray(x[y >= 5]), jnp.asarray(y[y >= 5]))  # noqa: E731
    return Task(
        "digits", model, params, r"hidden_[01]/kernel", 2, x_tr[:1],
        sampler(x_tr[y_tr >= 5], y_tr[y_tr >= 5]), xent, new(x_va, y_va), new(x_te, y_te),
        class_scores, steps, (1e-2, 3e-2, 1e-1, 3e-1), ("hidden_0/kernel", "hidden_1/kernel"),
        3e-2,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Methods. Each returns (trainable, frozen, loss, logits_fn, tx, count, post, post_state).


@dataclasses.dataclass
class Setup:
    trainable: Any
    frozen: Any
    logits: Callable[[Any, Any, Any], jax.Array]  # (trainable, frozen, inputs) -> logits
    tx: Callable[[optax.Schedule], optax.GradientTransformation]
    count: int
    penalty: Callable[[Any], jax.Array] | None = None
    post: Callable | None = None
    post_state: Any = None
    finish: Callable[[Any], tuple[Any, dict]] | None = None  # final trainable, extra info


def inputs_of(task: Task, batch: Any) -> Any:
    return batch if task.name == "decoder" else batch[0]


def _lora_like(task: Task, config: jlora.LoraConfig, frozen: Any, adapters: Any, tx=adam_tx):
    lm = jlora.linen.lora(task.model, config)
    return Setup(adapters, frozen, lambda a, p, x: lm.apply(p, a, x), tx, size(adapters))


def _config(task: Task, rank: int, alpha: float, **kw) -> jlora.LoraConfig:
    return jlora.LoraConfig(targets=task.targets, rank=rank, alpha=alpha, **kw)


def m_lora(task: Task, key: jax.Array, rank: int, *, rslora: bool = False) -> Setup:
    config = _config(task, rank, 2.0 * rank, use_rslora=rslora)  # scale 2 (2 sqrt(r) with rsLoRA)
    lm = jlora.linen.lora(task.model, config)
    return _lora_like(task, config, task.params, lm.init_adapters(key, task.params, task.sample))


def m_svd_init(task: Task, key: jax.Array, rank: int, *, kind: str) -> Setup:
    del key  # deterministic from the base weights
    config = _config(task, rank, float(rank))  # scale 1: PiSSA's residual is the minor part
    init = jv.pissa_init if kind == "pissa" else jv.olora_init
    residual, adapters = init(task.params, config)
    return _lora_like(task, config, residual, adapters)


def m_lora_fa(task: Task, key: jax.Array, ranks: dict[str, int]) -> Setup:
    """``a`` frozen; ``ranks`` per adapted kernel (the b's count is rank * fan_out)."""
    pattern = tuple(ranks.items())
    config = jlora.LoraConfig(
        targets=task.targets, rank=max(ranks.values()), alpha=2.0, rank_pattern=pattern,
        alpha_pattern=tuple((p, 2.0 * r) for p, r in pattern),
    )  # fmt: skip
    lm = jlora.linen.lora(task.model, config)
    adapters = lm.init_adapters(key, task.params, task.sample)
    setup = _lora_like(task, config, task.params, adapters, tx=lambda s: jv.lora_fa(adam_tx(s)))
    setup.count = sum(f.b.size for f in _factors(adapters))
    return setup


def _factors(adapters: Any) -> list[jlora.LoraFactors]:
    leaves = jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, jlora.LoraFactors))
    return [f for f in leaves if isinstance(f, jlora.LoraFactors)]


def m_dora(task: Task, key: jax.Array, rank: int) -> Setup:
    config = _config(task, rank, 2.0 * rank)
    adapters = jlora.init(key, task.params, config)
    magnitudes = jv.dora_magnitudes(task.params, adapters)

    def logits(trainable, params, x):
        a, m = trainable
        return task.model.apply({"params": jv.dora_merge(params, a, m)}, x)

    trainable = (adapters, magnitudes)
    return Setup(trainable, task.params, logits, adam_tx, size(trainable))


ADALORA = {"init": 1.5, "warmup": 0.1, "final": 0.3, "every": 10, "orth": 0.5}
"""AdaLoRA's knobs: initial rank as a multiple of the target's, t_i and t_f as fractions of the
steps, the masking interval delta_T and the regulariser's weight (PEFT's orth_reg_weight)."""


def m_adalora(task: Task, key: jax.Array, rank: int) -> Setup:
    r0 = int(round(ADALORA["init"] * rank))
    config = _config(task, r0, 2.0 * r0)  # scale 2
    ada = jv.adalora_init(key, task.params, config)
    b0 = jv.adalora_total_rank(ada)
    target = rank * len(task.weights)
    steps = task.steps
    warmup, final = int(ADALORA["warmup"] * steps), int(ADALORA["final"] * steps)
    budget = functools.partial(
        jv.adalora_budget, initial=b0, target=target, warmup=warmup, final=final, total=steps
    )

    def logits(ada, params, x):
        lora = jv.adalora_to_lora(ada, drop_masked=False)
        return task.model.apply({"params": jlora.merge(params, lora)}, x)

    def post(t, ada, grads, state):
        state = jv.adalora_update_importance(state, ada, grads)
        due = (t >= warmup) & ((t % ADALORA["every"] == 0) | (t >= steps - final))
        masked = jv.adalora_mask(ada, state, budget(t))
        ada = jax.tree.map(lambda m, o: jnp.where(due, m, o), masked, ada)
        return ada, state

    def finish(ada):
        ranks = jv.adalora_ranks(ada)
        lora = jv.adalora_to_lora(ada)
        is_ada = lambda x: isinstance(x, jv.AdaloraFactors)  # noqa: E731
        kept = sum(
            int(np.count_nonzero(np.asarray(f.lam))) * (f.p.shape[0] + f.q.shape[1] + 1)
            for f in jax.tree.leaves(ada, is_leaf=is_ada)
            if is_ada(f)
        )
        return ada, {"ranks": ranks, "final_count": kept, "lora": lora}

    return Setup(
        ada, task.params, logits, adam_tx, size(ada),
        penalty=lambda a: ADALORA["orth"] * jv.adalora_orth(a),
        post=post, post_state=jv.adalora_state(ada), finish=finish,
    )  # fmt: skip


def methods(task: Task) -> dict[str, Callable[[jax.Array], Setup]]:
    """The table's rows: name -> setup(key). Ranks are chosen for equal trainable counts."""
    r = task.rank
    shapes = {p: np.shape(w) for p, w in jlora._paths.leaves_with_paths(task.params)}
    # LoRA-FA trains b (rank * fan_out) only: rank r * (fan_in + fan_out) / fan_out matches LoRA.
    fa_equal = {}
    for path in task.weights:
        fan_in, fan_out = shapes[path]
        if (r * (fan_in + fan_out)) % fan_out:
            raise SystemExit(f"{path}: no LoRA-FA rank matches LoRA r={r} exactly")
        fa_equal[path] = r * (fan_in + fan_out) // fan_out
    return {
        f"LoRA r={r}": lambda k: m_lora(task, k, r),
        f"rsLoRA r={r}": lambda k: m_lora(task, k, r, rslora=True),
        f"DoRA r={r - 1}": lambda k: m_dora(task, k, r - 1),
        f"DoRA r={r}": lambda k: m_dora(task, k, r),
        f"PiSSA r={r}": lambda k: m_svd_init(task, k, r, kind="pissa"),
        f"OLoRA r={r}": lambda k: m_svd_init(task, k, r, kind="olora"),
        f"LoRA-FA r={r} (equal rank)": lambda k: m_lora_fa(task, k, dict.fromkeys(task.weights, r)),
        "LoRA-FA r=" + "/".join(map(str, fa_equal.values())) + " (equal params)": (
            lambda k: m_lora_fa(task, k, fa_equal)
        ),
        f"AdaLoRA {int(round(ADALORA['init'] * r))} -> {r} per weight": (
            lambda k: m_adalora(task, k, r)
        ),
    }


def fit_method(
    task: Task, name: str, make_setup: Callable, seed: int, lr: float
) -> tuple[Setup, Any, dict]:
    """Trains one method on one seed; runs of one method share a compilation (their ``logits``,
    ``tx``, ``penalty`` and ``post`` depend on the task and method only, not on the seed)."""
    setup = make_setup(jax.random.key(100 + seed))

    def loss(trainable, frozen, batch):
        value = task.loss(setup.logits(trainable, frozen, inputs_of(task, batch)), batch)
        return value if setup.penalty is None else value + setup.penalty(trainable)

    trainable, _ = train(
        loss, setup.trainable, setup.frozen, task.make, setup.tx(schedule_for(1.0, task.steps)),
        steps=task.steps, key=jax.random.key(200 + seed), lr=lr, post=setup.post,
        post_state=setup.post_state, cache=(task.name, name),
    )  # fmt: skip
    info = {}
    if setup.finish is not None:
        trainable, info = setup.finish(trainable)
    return setup, trainable, info


def evaluate(task: Task, setup: Setup, trainable: Any, data: Any) -> dict:
    return task.scores(setup.logits(trainable, setup.frozen, inputs_of(task, data)), data)


def experiment_a(task: Task, seeds: tuple[int, ...], sweep_seeds: tuple[int, ...]) -> dict:
    """Per method: the lr sweep (validation loss), then test scores per evaluation seed."""
    out = {}
    for name, make_setup in methods(task).items():
        sweep = {}
        for lr in task.lrs if sweep_seeds else ():
            runs = [fit_method(task, name, make_setup, s, lr) for s in sweep_seeds]
            losses = [evaluate(task, st, tr, task.val)["loss"] for st, tr, _ in runs]
            sweep[lr] = float(np.mean(losses))
        lr = min(sweep, key=sweep.get) if sweep else task.quick_lr
        per_seed, infos, trained = [], [], {}
        for s in seeds:
            setup, trainable, info = fit_method(task, name, make_setup, s, lr)
            per_seed.append(evaluate(task, setup, trainable, task.test))
            infos.append(info)
            trained[s] = trainable
        out[name] = {"lr": lr, "sweep": sweep, "runs": per_seed, "count": setup.count,
                     "infos": infos, "trained": trained}  # fmt: skip
        print(f"  {task.name} {name}: lr {lr:g}, {time.strftime('%H:%M:%S')}", flush=True)
    return out


def fmt(values: list[float], *, clip: tuple[float, float] | None = (0.0, 1.0)) -> str:
    mean, lo, hi = interval(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    if clip is not None:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def table_a(task: Task, results: dict, *, baseline: str) -> str:
    base = [run["score"] for run in results[baseline]["runs"]]
    base_loss = [run["loss"] for run in results[baseline]["runs"]]
    score = "token accuracy" if task.name == "decoder" else "test accuracy (5-9)"
    header = ["method", "trainable params", "lr (sweep: val. loss)", f"{score} [95% CI]",
              "paired diff. vs LoRA [95% CI]", "test loss [95% CI]", "paired loss diff. [95% CI]"]
    if task.name == "decoder":
        header.insert(4, "seeds exact >= 0.99")
    rows = []
    for name, res in results.items():
        runs = res["runs"]
        acc, loss = [r["score"] for r in runs], [r["loss"] for r in runs]
        count = f"{res['count']:,}"
        if res["infos"] and "final_count" in res["infos"][0]:
            finals = [i["final_count"] for i in res["infos"]]
            count += f" (final {min(finals):,}-{max(finals):,})"
        sweep = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in res["sweep"].items())
        same = name == baseline
        row = [name, count, f"{res['lr']:g} ({sweep})" if sweep else f"{res['lr']:g}", fmt(acc),
               "-" if same else fmt(list(np.subtract(acc, base)), clip=None),
               fmt(loss, clip=(0.0, np.inf)),
               "-" if same else fmt(list(np.subtract(loss, base_loss)), clip=None)]  # fmt: skip
        if task.name == "decoder":
            row.insert(4, f"{sum(r['exact'] >= 0.99 for r in runs)}/{len(runs)}")
        rows.append(row)
    return markdown_table(header, rows)


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
    config = _config(task, rank, 2.0 * rank)
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
