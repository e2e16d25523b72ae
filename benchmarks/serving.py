"""Mixed-adapter batches (``jlora.serving``) against the base forward and one adapter per call.

``python benchmarks/serving.py [--out results/serving-cpu.md]`` times, on the benchmark decoder
(pinned to one core; CPU time, interleaved rounds, see timing.py), the forward pass of one batch:

* ``base``: the frozen model alone;
* ``one adapter``: ``jlora.linen`` with one adapter for the whole batch (the single-adapter cost);
* ``mixed N=.., <strategy>``: ``jlora.serving.apply`` with a bank of N adapters, the examples
  assigned at random, for each strategy (gather, segment, onehot);
* ``separate N=..``: the batch split by adapter, one jitted single-adapter forward per sub-batch
  (what a server without mixed batches does; PEFT's ``adapter_names=`` loops the same way).

Ratios are to ``base`` and to ``one adapter``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from decoder import Decoder, Size  # noqa: E402
from timing import JaxCase, run_rounds  # noqa: E402

import jlora  # noqa: E402
import jlora.linen  # noqa: E402
from jlora.serving import STRATEGIES, AdapterBank, apply  # noqa: E402

TARGETS = ".*(query|key|value|out|up|down)/kernel"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class SeparateCase:
    """One jitted single-adapter forward per adapter present, each on its own sub-batch."""

    def __init__(self, name, forward, params, adapters, tokens, ids):
        self.name = name
        self.calls = []
        for n in np.unique(ids):
            sub = tokens[np.flatnonzero(ids == n)]
            compiled = forward.lower(params, adapters[int(n)], sub).compile()
            self.calls.append((compiled, (params, adapters[int(n)], sub)))

    def __call__(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready([c(*args) for c, args in self.calls])
        return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    size = Size(
        vocab=512, d_model=args.d_model, heads=4, layers=args.layers, seq=args.seq, batch=args.batch
    )
    model = Decoder(size)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, size.vocab, (size.batch, size.seq)), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    config = jlora.LoraConfig(targets=TARGETS, rank=args.rank, alpha=16.0)
    lora = jlora.linen.lora(model, config)
    template = lora.init_adapters(jax.random.key(1), params, tokens)
    n_max = max(args.adapters)
    adapters = [
        jax.tree.map(lambda x, i=i: x + 0.01 * (i + 1), template) for i in range(n_max)
    ]  # b != 0: every adapter does real work

    base = jax.jit(lambda p, t: model.apply({"params": p}, t))
    single = jax.jit(lambda p, a, t: lora.apply(p, a, t))
    cases = [
        JaxCase("base", base, (params, tokens), carry=0, loss_index=None),
        JaxCase("one adapter", single, (params, adapters[0], tokens), carry=0, loss_index=None),
    ]
    for n in args.adapters:
        bank = AdapterBank.build(
            params, {f"a{i}": adapters[i] for i in range(n)}, capacity=n, max_rank=args.rank
        )
        ids = jnp.asarray(rng.integers(0, n, size.batch), jnp.int32)
        for strategy in STRATEGIES:
            mixed = jax.jit(lambda p, f, i, t, s=strategy: apply(model, p, f, i, t, strategy=s))
            cases.append(
                JaxCase(
                    f"mixed N={n}, {strategy}",
                    mixed,
                    (params, bank.factors, ids, tokens),
                    carry=0,
                    loss_index=None,
                )
            )
        if n > 1:
            cases.append(
                SeparateCase(f"separate N={n}", single, params, adapters, tokens, np.asarray(ids))
            )
    log(f"{len(cases)} cases compiled; timing {args.steps} rounds")
    rows = run_rounds(cases, steps=args.steps, warmup=1, log=log)
    by_name = {r.name: r.cpu for r in rows}
    lines = [
        f"Decoder d_model={size.d_model}, layers={size.layers}, seq={size.seq}, "
        f"batch={size.batch}, rank {args.rank} on {TARGETS}; jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, 1 core, median CPU time of {args.steps} rounds",
        "",
        "| case | ms | x base | x one adapter |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {1e3 * r.cpu:.1f} | {r.cpu / by_name['base']:.2f} | "
            f"{r.cpu / by_name['one adapter']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
