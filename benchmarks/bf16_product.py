"""The bfloat16 all-linear step against its floor: where the difference goes (issue 18).

``cd benchmarks && PYTHONPATH=.. python bf16_product.py --steps 11`` times, on ``run.py``'s cpu
preset decoder (pinned to one core, interleaved rounds, one call of each case per round), the
frozen-base floor and the jlora all-linear step in float32 and in bfloat16, and the bfloat16 step
traced with the earlier product (each dot rounded to bfloat16, so ``x a`` is a bfloat16
intermediate). Per case: the median process CPU time, its kernel (system) part, the minor page
faults of one call and XLA's temp arena; and the per-round ratio to the same dtype's floor
(median, min, max), so a burst of load shows as spread.

XLA:CPU allocates a step's temporaries afresh on every call, so every call page-faults its whole
temp arena (256 faults per MiB with 4 KiB pages); that kernel time is part of the step's CPU time,
and the adapters' saved inputs enlarge the arena (``results/bf16-cpu.md``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import steps as train  # noqa: E402
from decoder import Decoder, Size  # noqa: E402
from timing import JaxCase  # noqa: E402

from jlora.ops import _dense  # noqa: E402


def bf16_intermediate(rows, a, b, scale):
    """The product before float32 accumulation: both dots in the input's dtype."""
    scaled_a = a.astype(rows.dtype) * jnp.asarray(scale, rows.dtype)
    a_t = jax.lax.optimization_barrier(scaled_a.T)
    xa = jax.lax.dot_general(rows, a_t, (((1,), (1,)), ((), ())))
    return jnp.matmul(xa, b.astype(rows.dtype))


def cases(size: Size) -> list[tuple[str, str, JaxCase]]:
    """``(name, dtype name, case)``: each dtype's floor first, then its adapter steps."""
    out = []
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name

        def build(dtype=dtype):
            return train.build(Decoder(size, dtype), size, dtype, rank=8, alpha=16.0, remat="off",
                               remat_policy="dots", peers={})["cases"]

        built = build()
        out.append((f"{name} floor", name, JaxCase("f", *built["floor"][:2], carry=0,
                                                     loss_index=None)))
        step = built["jlora (all linear)"][:2]
        out.append((f"{name} jlora (all linear)", name, JaxCase("j", *step, carry=2, loss_index=2)))
    # traced (in JaxCase) while patched
    current, _dense._factored = _dense._factored, bf16_intermediate
    try:
        step = build()["jlora (all linear)"][:2]
        out.append(("bfloat16 jlora, bfloat16 intermediate", "bfloat16",
                    JaxCase("o", *step, carry=2, loss_index=2)))
    finally:
        _dense._factored = current
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=11)
    args = parser.parse_args(argv)
    size = Size(vocab=512, d_model=512, heads=8, layers=4, seq=128, batch=4)
    todo = cases(size)
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _, _ in todo}
    load = os.getloadavg()[0]
    for i in range(1 + args.steps):  # one warm-up round
        for name, _, case in todo:
            before = resource.getrusage(resource.RUSAGE_SELF)
            _, cpu = case()
            after = resource.getrusage(resource.RUSAGE_SELF)
            if i:
                samples[name].append(
                    (cpu, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt)
                )
        print(f"  round {i}/{args.steps}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"jax {jax.__version__}, {size}, r=8, all six linears; median of {args.steps} "
          f"interleaved rounds; CPU time, 1 core; load (1 min) {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after.\n\n| step | cpu ms | of it system ms | page faults | "
          "temp MiB | x floor | per-round x floor [min, max] |\n| --- | ---: | ---: | ---: | ---: "
          "| ---: | --- |")
    floors = {dt: name for name, dt, _ in todo if name.endswith("floor")}
    for name, dt, case in todo:
        got, floor = samples[name], samples[floors[dt]]
        cpu = statistics.median(s[0] for s in got)
        ratios = [s[0] / f[0] for s, f in zip(got, floor, strict=True)]
        temp = case.compiled.memory_analysis().temp_size_in_bytes / 2**20
        system = statistics.median(s[1] for s in got)
        faults = statistics.median(s[2] for s in got)
        x_floor = cpu / statistics.median(f[0] for f in floor)
        print(f"| {name} | {1e3 * cpu:.1f} | {1e3 * system:.1f} | {faults:.0f} | {temp:.1f} | "
              f"{x_floor:.3f} | {statistics.median(ratios):.3f} [{min(ratios):.3f}, "
              f"{max(ratios):.3f}] |")


if __name__ == "__main__":
    main()
