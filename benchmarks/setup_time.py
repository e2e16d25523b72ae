"""Compile and set-up time: the adapted step's compile against the frozen step's, and set-up.

``python benchmarks/setup_time.py --out benchmarks/results/setup-time-cpu.md`` measures (pinned to
one core; wall and process CPU time, medians of ``--repeats`` interleaved repeats, each compile a
fresh ``jax.jit`` of a fresh function so no cache answers):

* compile time (``lower().compile()``) of the benchmark decoder's *floor* step (frozen base,
  gradient for the activations only), the jlora all-linear Adam step and the full fine-tune step;
* ``jlora.linen.lora(model, config).init_adapters(...)`` and ``jlora.nnx.lora(model, config)``
  wall time on the decoder at 2, 4 and 8 layers (d_model 128: set-up cost, not arithmetic);
* ``jax.eval_shape`` of ``jlora.init`` on an abstract Llama-70B-shaped tree (80 layers, all seven
  linears, r=16): no array is allocated, so this is jlora's own per-leaf overhead.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()

import decoder_nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import steps as train  # noqa: E402
from decoder import Decoder, Size  # noqa: E402
from flax import nnx  # noqa: E402

import jlora  # noqa: E402
import jlora.linen  # noqa: E402
import jlora.nnx  # noqa: E402


def _clock(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def compile_times(size: Size, repeats: int) -> dict[str, tuple[float, float]]:
    model = Decoder(size, jnp.float32)
    samples: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeats):
        # Fresh closures each repeat: jax's caches are keyed by function identity.
        built = train.build(
            model, size, jnp.float32, rank=8, alpha=16.0, remat="off", remat_policy="dots",
            peers={},
        )["cases"]
        for name in ("floor", "jlora (all linear)", "full"):
            step, args, _, _ = built[name]
            timed = _clock(lambda s=step, a=args: s.lower(*a).compile())
            samples.setdefault(name, []).append(timed)
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for k, v in samples.items()}


def setup_times(repeats: int) -> list[tuple[int, float, float]]:
    config = jlora.LoraConfig(targets=train.ALL_LINEAR, rank=8, alpha=16.0)
    nnx_config = jlora.LoraConfig(
        targets=r".*(query|key|value|out|up|down)/kernel", rank=8, alpha=16.0
    )
    rows = []
    for layers in (2, 4, 8):
        size = Size(vocab=512, d_model=128, heads=4, layers=layers, seq=32, batch=2)
        model = Decoder(size, jnp.float32)
        tokens = jnp.zeros((size.batch, size.seq), jnp.int32)
        params = model.init(jax.random.key(0), tokens)["params"]
        linen_s, nnx_s = [], []
        for _ in range(repeats):
            lora = jlora.linen.lora(model, config)
            linen_s.append(_clock(lambda: jax.block_until_ready(
                lora.init_adapters(jax.random.key(1), params, tokens)))[0])
            net = decoder_nnx.Decoder(size, jnp.float32, lora=(), rank=8, rngs=nnx.Rngs(0))
            nnx_s.append(_clock(lambda: jlora.nnx.lora(net, nnx_config, rngs=0))[0])
        rows.append((layers, statistics.median(linen_s), statistics.median(nnx_s)))
    return rows


def llama70b_shapes() -> dict:
    d, kv, ff, vocab = 8192, 1024, 28672, 128256
    s = jax.ShapeDtypeStruct
    layer = {
        "q": {"kernel": s((d, d), jnp.bfloat16)},
        "k": {"kernel": s((d, kv), jnp.bfloat16)},
        "v": {"kernel": s((d, kv), jnp.bfloat16)},
        "o": {"kernel": s((d, d), jnp.bfloat16)},
        "gate": {"kernel": s((d, ff), jnp.bfloat16)},
        "up": {"kernel": s((d, ff), jnp.bfloat16)},
        "down": {"kernel": s((ff, d), jnp.bfloat16)},
        "norm": {"scale": s((d,), jnp.bfloat16)},
    }
    tree = {f"layers_{i}": layer for i in range(80)}
    tree["embed"] = {"embedding": s((vocab, d), jnp.bfloat16)}
    return tree


def init_70b(repeats: int) -> tuple[float, int]:
    tree = llama70b_shapes()
    config = jlora.LoraConfig(targets=r".*/(q|k|v|o|gate|up|down)/kernel", rank=16, alpha=32.0)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.eval_shape(lambda k: jlora.init(k, tree, config), jax.random.key(0))
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(jax.tree.leaves(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loads = [os.getloadavg()[0]]
    size = Size(vocab=512, d_model=512, heads=8, layers=4, seq=128, batch=4)
    comp = compile_times(size, args.repeats)
    loads.append(os.getloadavg()[0])
    setup = setup_times(args.repeats)
    s70, n70 = init_70b(args.repeats)
    loads.append(os.getloadavg()[0])
    floor = comp["floor"]
    lines = [
        f"jax {jax.__version__}; {os.cpu_count()} cores, pinned to 1; medians of {args.repeats} "
        f"repeats; load average (1 min) {', '.join(f'{x:.1f}' for x in loads)} (start, after "
        "compiles, end).",
        "",
        f"Compile time, {size}:",
        "",
        "| step | wall s | cpu s | x floor (wall) |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {k} | {w:.2f} | {c:.2f} | {w / floor[0]:.2f} |" for k, (w, c) in comp.items()),
        "",
        "Adapter set-up (d_model 128, all six linears, r=8), wall seconds:",
        "",
        "| layers | jlora.linen init_adapters | jlora.nnx.lora |",
        "| ---: | ---: | ---: |",
        *(f"| {n} | {a:.3f} | {b:.3f} |" for n, a, b in setup),
        "",
        f"`jax.eval_shape(jlora.init)` on a Llama-70B-shaped abstract tree (80 layers x 7 linears, "
        f"r=16; {n70} factor leaves): {s70:.2f} s wall.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
