"""QLoRA on the benchmark decoder: base bytes, XLA's step memory and step time vs a bf16 base (CPU).

    .venv/bin/python -m benchmarks.quant [--configs bench,large] [--steps 10] [--out FILE.md]
    .venv/bin/python -m benchmarks.quant --memory   # temporaries: whole vs block-wise dequantise
    .venv/bin/python -m benchmarks.quant --hlo      # how XLA:CPU runs a bf16 product

For each decoder config (``bench``: ``benchmarks/run.py``'s CPU preset, d_model 512, 4 layers;
``large``: d_model 1024, 2 layers; ``small``: d_model 256, 2 layers, this script's earlier
default), one jitted LoRA train step (rank 8 on query/key/value/out/up/down: loss, gradients of
the factors, an SGD update) over six bases of the same weights:

- ``float32`` and ``bfloat16``: the float bases, computing in their own dtype;
- ``nf4+dq`` and ``int8`` (quantised from the bf16 weights, computing in bf16) through the
  adapted layers' block-wise ``jlora.quant.quantized_matmul`` (the default), and the same two
  through the *whole* route (each kernel dequantised whole, as un-adapted layers do).

Reported per base: the targeted kernels' bytes against bf16, XLA's memory account of the compiled
step (arguments, temporaries, and their sum with the outputs less donated aliases), the number of
``quantized_matmul`` calls traced into the step (so the route that is timed is the route named),
and the median step time over interleaved rounds (``timing.py``; process CPU time and wall).
Then the product alone, forward and input gradient, at the config's shapes: float32 and bf16
``x @ W``, bf16 with float32 accumulation, and the quantised products, which explain the step
times (``benchmarks/results/quant-cpu.md`` has a reading of them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import sys


def _threads(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=1)
    return pre.parse_known_args(argv)[0].threads


THREADS = _threads(sys.argv[1:])
if THREADS and __name__ == "__main__":
    # As benchmarks/run.py: on a small shared machine, pin to THREADS cores before jax starts so
    # that process CPU time is the step's own work (must precede the first jax import).
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if THREADS > 1 else 'false'}"
    ).strip()

from unittest import mock  # noqa: E402

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlora  # noqa: E402
import jlora.linen  # noqa: E402
import jlora.quant as jq  # noqa: E402
from benchmarks.decoder import Decoder, Size, next_token_loss  # noqa: E402
from benchmarks.timing import JaxCase, run_rounds  # noqa: E402

TARGETS = ".*/(query|key|value|out|up|down)/kernel"
CONFIGS = {
    # The last session's default (its one noisy step time: NF4 0.78x, int8 0.91x bf16).
    "small": Size(vocab=512, d_model=256, heads=4, layers=2, seq=64, batch=4),
    "bench": Size(vocab=512, d_model=512, heads=8, layers=4, seq=128, batch=4),
    "large": Size(vocab=512, d_model=1024, heads=16, layers=2, seq=128, batch=4),
}
MIB = 2**20


class MLP(nn.Module):
    """``layers`` tanh Dense layers of ``width`` (the case of results/quant-memory-cpu.md)."""

    layers: int = 8
    width: int = 512
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = nn.tanh(nn.Dense(self.width, dtype=self.dtype)(x))
        return x


def whole_weights():
    """The adapted layers dequantise their kernel whole (the metadata-box route)."""
    return mock.patch("jlora.linen._intercept.linen_base", lambda *a, **k: None)


@contextlib.contextmanager
def counting_products(counter: list[int]):
    """Counts the ``quantized_matmul`` calls the adapted layers trace (appends 1 per call)."""
    import jlora.quant._layers as layers

    original = layers.quantized_matmul

    def counted(*args, **kwargs):
        counter.append(1)
        return original(*args, **kwargs)

    with mock.patch.object(layers, "quantized_matmul", counted):
        yield


def temporaries(model, params, inputs, loss, config, route) -> tuple[float, float]:
    """``(arguments, temporaries)`` MiB of XLA's account of one compiled LoRA grad step."""
    adapted = jlora.linen.lora(model, config)
    adapters = adapted.init_adapters(jax.random.key(1), jq.abstract(params), inputs)
    with route():
        step = jax.jit(jax.grad(lambda a, p, x: loss(adapted.apply(p, a, x), x)))
        stats = step.lower(adapters, params, inputs).compile().memory_analysis()
    return stats.argument_size_in_bytes / MIB, stats.temp_size_in_bytes / MIB


def memory(args) -> None:
    """The temporaries table of results/quant-memory-cpu.md: whole vs block-wise dequantisation."""
    mlp = MLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 512)), jnp.float32)
    size = Size(vocab=512, d_model=args.d_model, heads=4, layers=args.layers, seq=args.seq,
                batch=args.batch)  # fmt: skip
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, size.vocab, (size.batch, size.seq)))
    cases = [
        ("mlp 8x512 f32", mlp, x, lambda y, x: jnp.sum(y**2), ".*kernel", jnp.float32),
        (
            f"decoder d{size.d_model} L{size.layers} bf16",
            Decoder(size, dtype=jnp.bfloat16),
            tokens,
            next_token_loss,
            TARGETS,
            jnp.bfloat16,
        ),
    ]
    print(f"{'model':24} {'base':8} {'dequantise':11} {'args MiB':>9} {'temps MiB':>10}")
    for name, model, inputs, loss, targets, dtype in cases:
        params = model.init(jax.random.key(0), inputs)["params"]
        params = jax.tree.map(lambda w, dtype=dtype: w.astype(dtype), params)
        config = jlora.LoraConfig(targets=targets, rank=8)
        rows = [(str(jnp.dtype(dtype)), "-", params, contextlib.nullcontext)]
        for kind in ("nf4", "int8"):
            q = jq.quantize(params, config, kind=kind)
            rows += [
                (kind, "whole", q, whole_weights),
                (kind, "block-wise", q, contextlib.nullcontext),
            ]
        for base, route, p, ctx in rows:
            arg, tmp = temporaries(model, p, inputs, loss, config, ctx)
            print(f"{name:24} {base:8} {route:11} {arg:9.2f} {tmp:10.2f}")


# --------------------------------------------------------------------------- the train step


def kernel_bytes(base, config) -> int:
    """Bytes of the targeted kernels (a quantised kernel counts its codes and scales)."""
    flat = jlora._paths.leaves_with_paths(base, is_leaf=lambda x: isinstance(x, jq.QuantizedWeight))
    return sum(jq.nbytes(leaf) for path, leaf in flat if config.selects(path))


def step_cases(size: Size) -> tuple[list[JaxCase], dict]:
    """The six train-step cases of one config, compiled, and their bytes and traced products."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, size.vocab, (size.batch, size.seq)))
    params32 = Decoder(size).init(jax.random.key(0), tokens)["params"]
    params16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params32)
    config = jlora.LoraConfig(targets=TARGETS, rank=8, alpha=16.0)
    nf4 = jq.quantize(params16, config, kind="nf4")
    int8 = jq.quantize(params16, config, kind="int8")
    plan = [  # name, compute dtype, base, route
        ("float32", jnp.float32, params32, contextlib.nullcontext),
        ("bfloat16", jnp.bfloat16, params16, contextlib.nullcontext),
        ("nf4+dq block-wise", jnp.bfloat16, nf4, contextlib.nullcontext),
        ("int8 block-wise", jnp.bfloat16, int8, contextlib.nullcontext),
        ("nf4+dq whole", jnp.bfloat16, nf4, whole_weights),
        ("int8 whole", jnp.bfloat16, int8, whole_weights),
    ]
    cases, info = [], {}
    for name, dtype, base, route in plan:
        adapted = jlora.linen.lora(Decoder(size, dtype=dtype), config)
        adapters = adapted.init_adapters(jax.random.key(1), jq.abstract(params32), tokens)

        def step(adapters, base, tokens, adapted=adapted):
            def loss(a):
                return next_token_loss(adapted.apply(base, a, tokens), tokens)

            value, grads = jax.value_and_grad(loss)(adapters)
            return jax.tree.map(lambda p, g: p - 0.01 * g, adapters, grads), value

        traced: list[int] = []
        with route(), counting_products(traced):
            case = JaxCase(name, jax.jit(step), (adapters, base, tokens), carry=1, loss_index=1)
        stats = case.compiled.memory_analysis()
        info[name] = {
            "bytes": kernel_bytes(base, config),
            "args": stats.argument_size_in_bytes,
            "temps": stats.temp_size_in_bytes,
            "total": case.memory,
            "products": len(traced),
        }
        cases.append(case)
    info["kernels"] = sum(
        isinstance(x, jq.QuantizedWeight)
        for x in jax.tree.leaves(nf4, is_leaf=lambda x: isinstance(x, jq.QuantizedWeight))
    )
    return cases, info


def step_table(rows, info) -> str:
    by = {r.name: r for r in rows}
    ref, f32 = by["bfloat16"], by["float32"]
    b16 = info["bfloat16"]
    lines = [
        "| base | compute | kernel bytes | x bf16 | args MiB | temps MiB | XLA total MiB | total "
        "x bf16 | products traced | step ms (CPU) | x bf16 | x f32 | step ms (wall) | first loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        i = info[r.name]
        compute = "float32" if r.name == "float32" else "bfloat16"
        lines.append(
            f"| {r.name} | {compute} | {i['bytes']:,} | {i['bytes'] / b16['bytes']:.3f} | "
            f"{i['args'] / MIB:.1f} | {i['temps'] / MIB:.1f} | {i['total'] / MIB:.1f} | "
            f"{i['total'] / b16['total']:.2f} | {i['products']}/{info['kernels']} | "
            f"{1e3 * r.cpu:.1f} | {r.cpu / ref.cpu:.2f} | {r.cpu / f32.cpu:.2f} | "
            f"{1e3 * r.wall:.1f} | {r.loss:.4f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the product alone


def product_cases(size: Size) -> list[tuple[str, JaxCase]]:
    """Forward plus input gradient of one ``(tokens, k) @ (k, n)`` product, per route and shape."""
    tokens = size.batch * size.seq
    d, f = size.d_model, size.d_ff
    rng = np.random.default_rng(0)
    out = []
    for k, n in ((d, d), (d, f), (f, d)):
        w32 = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
        w16 = w32.astype(jnp.bfloat16)
        x32 = jnp.asarray(rng.standard_normal((tokens, k)), jnp.float32)
        x16 = x32.astype(jnp.bfloat16)
        nf4 = jq.quantize({"w": w16}, "w", kind="nf4")["w"]
        int8 = jq.quantize({"w": w16}, "w", kind="int8")["w"]

        def acc32(x, w):
            return jax.lax.dot_general(
                x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )

        routes = [
            ("f32 x @ W", lambda x, w: x @ w, x32, w32),
            ("bf16 x @ W (bf16 out)", lambda x, w: x @ w, x16, w16),
            ("bf16, f32 accumulate", acc32, x16, w16),
            ("nf4 quantized_matmul", jq.quantized_matmul, x16, nf4),
            ("nf4 dequantize whole, bf16 @", lambda x, q: x @ jq.dequantize(q), x16, nf4),
            ("int8 quantized_matmul", jq.quantized_matmul, x16, int8),
        ]
        for name, fn, x, w in routes:

            def fwd_bwd(x, w, fn=fn):
                y, pull = jax.vjp(lambda x: fn(x, w), x)
                return y, pull(jnp.ones_like(y))[0]

            label = f"({tokens}, {k}) @ ({k}, {n}): {name}"
            out.append((f"{k}x{n}", JaxCase(label, jax.jit(fwd_bwd), (x, w), carry=0,
                                            loss_index=None)))  # fmt: skip
    return out


def product_table(rows, shapes) -> str:
    lines = ["| product (fwd + dx) | ms (CPU) | x bf16 out | x f32 | ms (wall) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    ref = {}
    for shape, r in zip(shapes, rows, strict=True):
        if r.name.endswith("(bf16 out)"):
            ref[shape, "bf16"] = r.cpu
        if r.name.endswith("f32 x @ W"):
            ref[shape, "f32"] = r.cpu
    for shape, r in zip(shapes, rows, strict=True):
        lines.append(
            f"| {r.name} | {1e3 * r.cpu:.2f} | {r.cpu / ref[shape, 'bf16']:.2f} | "
            f"{r.cpu / ref[shape, 'f32']:.2f} | {1e3 * r.wall:.2f} |"
        )
    return "\n".join(lines)


def hlo() -> None:
    """The optimised HLO of a bf16 product with a bf16 and with a float32 result."""
    x, w = jnp.ones((512, 512), jnp.bfloat16), jnp.ones((512, 2048), jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    for name, fn in (
        ("bf16 x @ W, bf16 result", lambda x, w: x @ w),
        ("bf16 x @ W, float32 result (preferred_element_type, as quantized_matmul)",
         lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)),
    ):  # fmt: skip
        text = jax.jit(fn).lower(x, w).compile().as_text()
        entry = text[text.index("ENTRY") :]
        print(f"{name}:")
        for line in entry.splitlines()[1:]:
            if "fusion(" in line or "dot(" in line:
                print("   ", line.strip().split(", metadata")[0].split(", backend_config")[0])


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    import jaxlib

    return (
        f"{model}, {os.cpu_count()} cores ({platform.machine()}), "
        f"this process on {len(os.sched_getaffinity(0))} of them; Python "
        f"{platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax "
        f"{flax.__version__}, numpy {np.__version__}; device {jax.devices()[0].device_kind}"
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="bench,large", help=f"of {sorted(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="cores to pin to (0: all)")
    parser.add_argument("--out", default=None, help="also write the report to this .md file")
    parser.add_argument("--memory", action="store_true", help="the temporaries table only")
    parser.add_argument("--hlo", action="store_true", help="XLA's code for a bf16 product only")
    parser.add_argument("--d-model", type=int, default=256, help="--memory's decoder")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if args.memory:
        memory(args)
        return
    if args.hlo:
        hlo()
        return
    command = f"python -m benchmarks.quant {' '.join(sys.argv[1:])}".strip()
    parts = [f"Machine: {machine()}.", f"Command: `{command}`"]
    for name in args.configs.split(","):
        size = CONFIGS[name]
        log(f"{name}: compiling the train steps")
        load = [os.getloadavg()[0]]
        cases, info = step_cases(size)
        rows = run_rounds(cases, steps=args.steps, warmup=args.warmup, log=log)
        for case in cases:
            case.close()
        log(f"{name}: the product alone")
        labelled = product_cases(size)
        products = run_rounds([c for _, c in labelled], steps=args.steps, warmup=args.warmup,
                              log=log)  # fmt: skip
        load.append(os.getloadavg()[0])
        parts += [
            f"## {name}: decoder d_model {size.d_model}, {size.layers} layers, {size.heads} heads, "
            f"seq {size.seq}, batch {size.batch}; LoRA r=8 on `{TARGETS}`",
            f"Median of {args.steps} interleaved rounds after {args.warmup} warm-up; load average "
            f"(1 min) {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} cores.",
            "Train step (loss, factor gradients, SGD update):\n\n" + step_table(rows, info),
            "The product alone (forward and input gradient, one weight):\n\n"
            + product_table(products, [s for s, _ in labelled]),
        ]
    report = "\n\n".join(parts)
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
