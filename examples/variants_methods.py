"""examples/variants.py's methods (LoRA and each variant) and experiment A (variants against LoRA)."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rank_ablation import interval, markdown_table
from variants_tasks import Task, adam_tx, schedule_for, size, train

import jlora
import jlora.linen
import jlora.variants as jv

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


def lora_config(task: Task, rank: int, alpha: float, **kw) -> jlora.LoraConfig:
    return jlora.LoraConfig(targets=task.targets, rank=rank, alpha=alpha, **kw)


def m_lora(task: Task, key: jax.Array, rank: int, *, rslora: bool = False) -> Setup:
    config = lora_config(task, rank, 2.0 * rank, use_rslora=rslora)  # scale 2 (2 sqrt(r) with rsLoRA)
    lm = jlora.linen.lora(task.model, config)
    return _lora_like(task, config, task.params, lm.init_adapters(key, task.params, task.sample))


def m_svd_init(task: Task, key: jax.Array, rank: int, *, kind: str) -> Setup:
    del key  # deterministic from the base weights
    config = lora_config(task, rank, float(rank))  # scale 1: PiSSA's residual is the minor part
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
    config = lora_config(task, rank, 2.0 * rank)
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
    config = lora_config(task, r0, 2.0 * r0)  # scale 2
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
