"""Experiment 2 of the LoRA experiments: the rank and target ablation (the paper's Tables 5, 6).

Pretrain the decoder of ``decoder_tasks.py`` (2 layers, ``d_model`` 128) to *copy* a sequence of 8 random symbols, freeze it, and LoRA-adapt it to
*reverse* the sequence, with ranks ``r`` in {1, 2, 4, 8, 64} on the attention projections {q},
{q, v} and {q, k, v, o} of both layers, five seeds each (seed: adapter init and batches). Reversing
needs the skills the base has (read a symbol, write it) routed to other positions; the base scores
near chance on it, so the adaptation has something to learn. Every run: 500 Adam steps of 32
sequences, learning rate 5e-3 (full fine-tune 1e-3), 10% warm-up then cosine decay, gradients
clipped to norm 1, ``alpha = 8`` for every ``r`` (the paper fixes alpha and does not retune it).

:class:`Runs` holds the pretrained base and every adapter it trains, for experiment 3
(``subspaces.py``, which runs both experiments).
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

import jlora
import jlora.analysis as an
import jlora.linen

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decoder_tasks import Decoder, Spec, answer_loss, answer_scores, fit, make_batch

TARGETS = {"q": "query", "q,v": "query|value", "q,k,v,o": "query|key|value|out"}
RANKS = (1, 2, 4, 8, 64)
BATCH = 32


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; floats get 3 decimals, ints thousands separators."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = [header, ["---"] * len(header), *[[cell(v) for v in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


class Runs:
    """The pretrained base and the adaptation runs of experiment 2, on one fixed test set."""

    def __init__(self, spec: Spec, *, pretrain_steps: int, adapt_steps: int, alpha: float):
        self.spec, self.adapt_steps, self.alpha = spec, adapt_steps, alpha
        self.model = Decoder(spec)
        self.test = make_batch(jax.random.key(12345), spec, "reverse", 1024)
        params = self.model.init(jax.random.key(0), self.test[:1])["params"]
        self.params = fit(
            lambda p, _, tokens: answer_loss(self.model.apply({"params": p}, tokens), tokens, spec),
            params,
            None,
            lambda k: make_batch(k, spec, "copy", BATCH),
            steps=pretrain_steps,
            lr=3e-3,
            key=jax.random.key(1),
        )
        self.adapters: dict[tuple[str, int, int], dict] = {}
        self.initial: dict[tuple[str, int, int], dict] = {}

    def scores(self, logits: jax.Array, tokens: jax.Array | None = None) -> dict[str, float]:
        """Token accuracy, exact match and loss on ``tokens`` (default: the reversal test set)."""
        tokens = self.test if tokens is None else tokens
        accuracy, exact = answer_scores(logits, tokens, self.spec)
        return {
            "accuracy": accuracy,
            "exact": exact,
            "loss": float(answer_loss(logits, tokens, self.spec)),
        }

    def base(self, task: str = "reverse") -> dict[str, float]:
        """The frozen base's scores on 1,024 held-out sequences of ``task``."""
        tokens = make_batch(jax.random.key(12345), self.spec, task, 1024)
        return self.scores(self.model.apply({"params": self.params}, tokens), tokens)

    def full_finetune(self, seed: int = 0, *, lr: float = 1e-3) -> dict[str, float]:
        """Fine-tunes every base weight on reversal; scores and the trainable count."""
        apply = lambda p, tokens: self.model.apply({"params": p}, tokens)  # noqa: E731
        params = fit(
            lambda p, _, tokens: answer_loss(apply(p, tokens), tokens, self.spec),
            self.params,
            None,
            lambda k: make_batch(k, self.spec, "reverse", BATCH),
            steps=self.adapt_steps,
            lr=lr,
            key=jax.random.key(200 + seed),
        )
        return {
            **self.scores(apply(params, self.test)),
            "trainable": jlora.count_params(params, {}).base,
        }

    def lora(self, targets: str, rank: int, seed: int = 0, *, lr: float = 5e-3) -> dict[str, float]:
        """LoRA on ``TARGETS[targets]`` of every layer; keeps the adapters (and their init)."""
        config = jlora.LoraConfig(
            targets=rf"layers_\d+/({TARGETS[targets]})/kernel", rank=rank, alpha=self.alpha
        )
        model = jlora.linen.lora(self.model, config)
        initial = model.init_adapters(jax.random.key(100 + seed), self.params, self.test[:1])
        adapters = fit(
            lambda a, p, tokens: answer_loss(model.apply(p, a, tokens), tokens, self.spec),
            initial,
            self.params,
            lambda k: make_batch(k, self.spec, "reverse", BATCH),
            steps=self.adapt_steps,
            lr=lr,
            key=jax.random.key(200 + seed),
        )
        self.adapters[targets, rank, seed], self.initial[targets, rank, seed] = adapters, initial
        trainable = jlora.count_params(self.params, adapters).trainable
        paper = an.lora_param_count(
            len(targets.split(",")) * self.spec.layers, self.spec.d_model, rank
        )
        if trainable != paper:  # every target is a square d_model x d_model projection
            raise SystemExit(f"{trainable:,} trainable parameters, the paper's formula {paper:,}")
        return {
            **self.scores(model.apply(self.params, adapters, self.test)),
            "trainable": trainable,
        }


def _mean(runs: list[dict[str, float]], key: str) -> float:
    return float(np.mean([run[key] for run in runs]))


def interval(values: list[float] | np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval of the mean over independent seeds (``(m, m, m)`` for one)."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return mean, float(mean - half), float(mean + half)


def _spread(runs: list[dict[str, float]], key: str, *, bounded: bool = True) -> str:
    """``mean`` with one seed, ``mean [95% interval] (min-max)`` with several.

    The interval is clipped below at 0 (scores and losses), and above at 1 if ``bounded``.
    """
    values = [run[key] for run in runs]
    mean, lo, hi = interval(values)
    if len(runs) == 1:
        return f"{mean:.3f}"
    lo, hi = max(lo, 0.0), min(hi, 1.0) if bounded else hi  # scores and losses are >= 0
    return f"{mean:.3f} [{lo:.2f}, {hi:.2f}] ({min(values):.2f}-{max(values):.2f})"


def solved(runs: list[dict[str, float]], level: float = 0.99) -> str:
    """How many seeds reach exact match ``>= level``: ``"k/n"``."""
    return f"{sum(run['exact'] >= level for run in runs)}/{len(runs)}"


def experiment_2(
    runs: Runs, ranks: tuple[int, ...], targets: tuple[str, ...], seeds: tuple[int, ...]
) -> tuple[str, dict]:
    """The ablation table: reversal scores (mean, 95% interval, range over seeds), trainable counts."""
    per_seed = {("base", 0): [{**runs.base(), "trainable": 0}]}
    per_seed["full", 0] = [runs.full_finetune(seed) for seed in seeds]
    for t in targets:
        for r in ranks:
            per_seed[t, r] = [runs.lora(t, r, seed) for seed in seeds]
    results = {
        k: {m: _mean(s, m) for m in ("accuracy", "exact", "loss", "trainable")} | {"runs": s}
        for k, s in per_seed.items()
    }
    return ablation_table(results), results


def _order(key: tuple[str, int]) -> tuple[int, int]:
    """Table order: base, full fine-tune, then TARGETS' order and rank (pickles sort dict keys)."""
    methods = ["base", "full", *TARGETS]
    return methods.index(key[0]), key[1]


def ablation_table(results: dict) -> str:
    """Markdown rows of :func:`experiment_2`'s results (each ``results[key]["runs"]``: per seed)."""
    names = {"base": "frozen base (no adaptation)", "full": "full fine-tune"}
    rows = [
        [names.get(t, f"LoRA {{{t}}}"), r or "-", s[0]["trainable"], _spread(s, "accuracy"),
         _spread(s, "exact"), solved(s), _spread(s, "loss", bounded=False)]
        for (t, r), s in ((k, results[k]["runs"]) for k in sorted(results, key=_order))
    ]  # fmt: skip
    header = ["method", "r", "trainable params", "token accuracy [95% CI] (min-max)",
              "exact match [95% CI] (min-max)", "seeds exact >= 0.99", "test loss"]  # fmt: skip
    return markdown_table(header, rows)
