"""jlora's train step against the frozen-base floor, a full fine-tune, the naive merged step and peers.

Usage:
    .venv/bin/python benchmarks/run.py                       # CPU defaults, a few minutes
    .venv/bin/python benchmarks/run.py --preset gpu          # larger sizes, bfloat16 compute
    .venv/bin/python benchmarks/run.py --d-model 256 --layers 2 --steps 5 --remat both

Peers run when installed (the ``bench`` extra): Flax NNX's ``nnx.LoRALinear`` (always, it ships
with flax), qwix, and Hugging Face PEFT on PyTorch (CPU, float32; each torch case in a subprocess
so its peak RSS is its own). All cases use the same decoder, weights and batch; every step is timed
in interleaved rounds (``timing.py``): the median of ``--steps`` rounds after ``--warmup``. Ratios
are to *full* (Adam on every weight) and *floor* (frozen forward plus the backward pass for
activations only: no LoRA step can be cheaper), on the ``--clock``: process CPU time by default on
a CPU (the machine's other load then counts less), the wall clock on an accelerator. Memory is
XLA's own account of each compiled step (arguments + temporaries + outputs - donated aliases); the
torch peer reports its process's peak RSS instead. Writes ``<out>/<preset>-<platform>.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def _threads(argv: list[str]) -> int:
    """``--threads`` (default 1 for the cpu preset, 0 = unchanged for the gpu preset)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu")
    pre.add_argument("--threads", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    return known.threads if known.threads is not None else int(known.preset == "cpu")


THREADS = _threads(sys.argv[1:])
if THREADS:
    # Must precede the first jax import. On a small machine shared with other jobs, a step that
    # splits each op over several threads waits at every op for a core to come free, so the clock
    # measures the scheduler; pinned to THREADS cores (torch children inherit it) with XLA's and
    # torch's intra-op pools at that size, CPU time is the step's own work.
    # XLA has no intra-op thread flag (a bare `intra_op_parallelism_threads=N` token in
    # XLA_FLAGS silently ends parsing there); its pool sizes itself from this affinity mask.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if THREADS > 1 else 'false'}"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import peer_peft  # noqa: E402
import peer_qwix  # noqa: E402
import steps as train  # noqa: E402
from decoder import REMAT_POLICIES, Decoder, Size  # noqa: E402
from timing import JaxCase, Measured, run_rounds  # noqa: E402

import jlora  # noqa: E402
import jlora.linen  # noqa: E402

HERE = pathlib.Path(__file__).parent
PRESETS = {
    "cpu": {"d_model": 512, "layers": 4, "heads": 8, "seq": 128, "batch": 4, "vocab": 512},
    "gpu": {"d_model": 2048, "layers": 8, "heads": 16, "seq": 1024, "batch": 8, "vocab": 32000},
}
RANK, ALPHA = 8, 16.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def inference_cases(model, params, tokens, lora, adapters) -> list[JaxCase]:
    merged = jlora.merge(params, adapters)
    base = jax.jit(lambda p, t: model.apply({"params": p}, t))
    factored = jax.jit(lambda p, a, t: lora.apply(p, a, t))
    return [
        JaxCase("forward: base", base, (params, tokens), carry=0, loss_index=None),
        JaxCase("forward: merged", base, (merged, tokens), carry=0, loss_index=None),
        JaxCase(
            "forward: factored", factored, (params, adapters, tokens), carry=0, loss_index=None
        ),
    ]


def merge_time(params, adapters, repeats: int = 5) -> float:
    jax.block_until_ready(jlora.merge(params, adapters))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jlora.merge(params, adapters))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def checkpoint_merge(size: Size) -> dict | str:
    """Checkpoint-merge throughput and peak RSS, measured in fresh subprocesses."""
    with tempfile.TemporaryDirectory(prefix="jlora-bench-ckpt-") as work:
        spec = {
            "size": dataclasses.asdict(size),
            "targets": train.ALL_LINEAR,
            "rank": RANK,
            "alpha": ALPHA,
        }
        script = str(HERE / "ckpt_merge.py")
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(
            [sys.executable, script, "prepare", work, json.dumps(spec)],
            cwd=HERE,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            return (
                f"checkpoint merge skipped: prepare failed: {done.stderr.strip().splitlines()[-1:]}"
            )
        done = subprocess.run(
            [sys.executable, script, "merge", work],
            cwd=HERE,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            return f"checkpoint merge failed: {done.stderr.strip().splitlines()[-1:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def table(rows: list[Measured], clock: str) -> str:
    ref = {r.name: r for r in rows}
    full, floor = ref["full"], ref["floor"]
    lines = [
        f"| step | {clock} ms | wall ms | x full | x floor | XLA memory MiB | memory x full "
        "| peak RSS MiB (before step 1) | loss at step 0 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s = r.seconds(clock)
        mem_ratio = "" if r.memory_bytes is None else f"{r.memory_bytes / full.memory_bytes:.2f}"
        torch_ref = ref.get("torch: floor") if r.name.startswith(("PEFT", "torch")) else None
        ratio_floor = f"{s / floor.seconds(clock):.2f}"
        if torch_ref is not None:  # the torch cases against torch's own full and floor as well
            ratio_floor += f" ({s / torch_ref.seconds(clock):.2f} of torch floor)"
        loss = "" if r.loss is None else f"{r.loss:.5f}"
        rss = (
            ""
            if r.peak_rss_bytes is None
            else f"{_mib(r.peak_rss_bytes)} ({_mib(r.rss_before_bytes)})"
        )
        lines.append(
            f"| {r.name} | {1e3 * s:.1f} | {1e3 * r.wall:.1f} | {s / full.seconds(clock):.2f} | "
            f"{ratio_floor} | {_mib(r.memory_bytes)} | {mem_ratio} | {rss} | {loss} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for field in ("d_model", "layers", "heads", "seq", "batch", "vocab"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--remat",
        choices=["off", "on", "both"],
        default="both",
        help="jlora steps without / with per-block recomputation (nn.remat), which recomputes "
        "the adapters' saved inputs instead of keeping them",
    )
    parser.add_argument("--remat-policy", choices=sorted(REMAT_POLICIES), default="dots")
    parser.add_argument("--peers", default="nnx,qwix,peft", help="comma-separated; '' for none")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pin to this many cores and size XLA's and torch's pools to it (default 1 for the "
        "cpu preset; 0 leaves threading alone)",
    )
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint merge")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)

    sizes = dict(PRESETS[args.preset])
    for field in sizes:
        if getattr(args, field) is not None:
            sizes[field] = getattr(args, field)
    size = Size(**sizes)
    dtype_name = args.dtype or ("bfloat16" if args.preset == "gpu" else "float32")
    dtype = jnp.dtype(dtype_name)
    device = jax.devices()[0]
    clock = args.clock or ("cpu" if device.platform == "cpu" else "wall")
    model = Decoder(size, dtype)
    wanted = {p for p in args.peers.split(",") if p}
    skipped = []
    if "qwix" in wanted and (why := peer_qwix.available()):
        skipped.append(why)
        wanted.discard("qwix")
    if "peft" in wanted and dtype_name != "float32":
        skipped.append("PEFT peer skipped: the torch twin runs float32 only")
        wanted.discard("peft")
    if "peft" in wanted and (why := peer_peft.available()):
        skipped.append(why)
        wanted.discard("peft")
    header = (
        f"Device: {device.device_kind} ({device.platform}, {os.cpu_count()} cores); jax {jax.__version__}; "
        f"{platform.machine()}; {size}; compute {dtype_name}; LoRA r={RANK}, alpha={ALPHA:g}; "
        f"median of {args.steps} interleaved rounds after {args.warmup} warm-up; ratios on {clock} time; "
        f"{f'pinned to {THREADS} core(s)' if THREADS else 'default threading'}."
    )
    log(header)

    built = train.build(
        model,
        size,
        dtype,
        rank=RANK,
        alpha=ALPHA,
        remat=args.remat,
        remat_policy=args.remat_policy,
        peers={"nnx": "nnx" in wanted, "qwix": "qwix" in wanted},
    )
    cases = []
    for name, (step, step_args, carry, loss_index) in built["cases"].items():
        log(f"compiling {name}")
        cases.append(JaxCase(name, step, step_args, carry=carry, loss_index=loss_index))
    if "peft" in wanted:
        log("starting the torch subprocesses")
        cases += peer_peft.cases(
            built["params"],
            built["tokens"],
            dataclasses.asdict(size),
            rank=RANK,
            alpha=ALPHA,
            threads=THREADS,
        )
    load_before = os.getloadavg()
    rows = run_rounds(cases, steps=args.steps, warmup=args.warmup, log=log)
    for case in cases:
        case.close()
    for row, case in zip(rows, cases, strict=True):
        row.peak_rss_bytes = getattr(case, "peak_rss", None)
        row.rss_before_bytes = getattr(case, "rss_before", None)
        row.loss = case.first_loss
    del cases

    lora, adapters = built["inference"]
    infer_cases = inference_cases(model, built["params"], built["tokens"], lora, adapters)
    infer = run_rounds(infer_cases, steps=args.steps, warmup=args.warmup, log=log)
    merge_s = merge_time(built["params"], adapters)
    ckpt = (
        "checkpoint merge skipped (--no-checkpoint)"
        if args.no_checkpoint
        else checkpoint_merge(size)
    )
    load_after = os.getloadavg()

    base = infer[0].seconds(clock)
    if isinstance(ckpt, dict):
        ckpt_line = (
            f"Checkpoint merge (all-linear adapters into an orbax base checkpoint, on disk): "
            f"{ckpt['bytes'] / 1e6:.1f} MB in {ckpt['seconds']:.2f} s = {ckpt['mb_per_s']:.1f} MB/s, "
            f"peak RSS {_mib(ckpt['peak_rss'])} MiB."
        )
    else:
        ckpt_line = ckpt
    report = "\n\n".join(
        [
            header,
            f"Load average (1 min) {load_before[0]:.1f} before and {load_after[0]:.1f} after the "
            f"timed rounds on {os.cpu_count()} cores.",
            "Train step:\n\n" + table(rows, clock),
            "Inference (forward only):\n\n"
            + "\n".join(
                f"- {r.name}: {1e3 * r.seconds(clock):.1f} ms {clock} ({r.seconds(clock) / base:.2f} x base), "
                f"{1e3 * r.wall:.1f} ms wall"
                for r in infer
            ),
            f"In-memory merge of the all-linear adapters: {1e3 * merge_s:.1f} ms wall.",
            ckpt_line,
            *skipped,
        ]
    )
    print(report)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.preset}-{device.platform}-{dtype_name}"
    (out / f"{name}.md").write_text(report + "\n")
    (out / f"{name}.json").write_text(
        json.dumps(
            {
                "device": device.device_kind,
                "jax": jax.__version__,
                "size": dataclasses.asdict(size),
                "dtype": dtype_name,
                "clock": clock,
                "load_average": [load_before[0], load_after[0]],
                "train": [dataclasses.asdict(r) for r in rows],
                "inference": [dataclasses.asdict(r) for r in infer],
                "merge_seconds": merge_s,
                "checkpoint_merge": ckpt,
                "skipped": skipped,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
