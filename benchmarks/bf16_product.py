"""The bfloat16 all-linear step with jlora's factored product against the product it replaced.

``cd benchmarks && PYTHONPATH=.. python bf16_product.py --steps 11`` times, on ``run.py``'s cpu
preset decoder in bfloat16 (pinned to one core, CPU time, interleaved rounds: ``timing.py``), the
frozen-base floor, the jlora all-linear step, and the same step traced with the earlier product
(each dot rounded to bfloat16, so ``x a`` is a bfloat16 intermediate). Ratios are to the floor.
"""

from __future__ import annotations

import argparse
import os
import sys

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import steps as train  # noqa: E402
from decoder import Decoder, Size  # noqa: E402
from timing import JaxCase, run_rounds  # noqa: E402

from jlora import ops  # noqa: E402


def bf16_intermediate(rows, a, b, scale):
    """The product before float32 accumulation: both dots in the input's dtype."""
    scaled_a = a.astype(rows.dtype) * jnp.asarray(scale, rows.dtype)
    a_t = jax.lax.optimization_barrier(scaled_a.T)
    xa = jax.lax.dot_general(rows, a_t, (((1,), (1,)), ((), ())))
    return jnp.matmul(xa, b.astype(rows.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=11)
    args = parser.parse_args(argv)
    size = Size(vocab=512, d_model=512, heads=8, layers=4, seq=128, batch=4)
    model = Decoder(size, jnp.bfloat16)

    def build():
        return train.build(model, size, jnp.bfloat16, rank=8, alpha=16.0, remat="off",
                           remat_policy="dots", peers={})["cases"]

    built = build()
    cases = [JaxCase("floor", *built["floor"][:2], carry=0, loss_index=None)]
    step = built["jlora (all linear)"]
    cases.append(JaxCase("jlora, float32 accumulation", *step[:2], carry=2, loss_index=2))
    current, ops._factored = ops._factored, bf16_intermediate  # traced while patched
    try:
        step = build()["jlora (all linear)"]
        cases.append(JaxCase("jlora, bfloat16 intermediate", *step[:2], carry=2, loss_index=2))
    finally:
        ops._factored = current
    load = os.getloadavg()[0]
    rows = run_rounds(cases, steps=args.steps, warmup=1, log=lambda m: print(m, file=sys.stderr))
    print(f"jax {jax.__version__}, {size}, bfloat16, r=8; median of {args.steps} interleaved "
          f"rounds; CPU time, 1 core; load (1 min) {load:.1f} before, {os.getloadavg()[0]:.1f} "
          "after.\n\n| step | cpu ms | x floor | XLA memory MiB |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        mem = r.memory_bytes / 2**20 if r.memory_bytes else float("nan")
        print(f"| {r.name} | {1e3 * r.cpu:.1f} | {r.cpu / rows[0].cpu:.3f} | {mem:.1f} |")


if __name__ == "__main__":
    main()
