"""``merge_checkpoint`` at >= 1 GB against orbax's restore + save of the same tree, same disk.

``python benchmarks/ckpt_merge_large.py --dir /tmp/jlora-ckpt --out results/ckpt-merge-large.md``
writes, for each layout (float32 and bfloat16; *many* leaves of 1 MiB or 512 KiB and *few* leaves of
128 MiB), a base checkpoint of about 1 GiB with ``ocp.StandardCheckpointer`` and an r=8 adapter on
every leaf (``--scale 0.25``: a quarter of the leaves, about 256 MiB), then times in fresh
subprocesses, alternating, ``--rounds`` times each:

* ``orbax``: ``StandardCheckpointer().restore(base)`` then ``.save(out, tree)``: the floor for any
  merge that must read and write every byte;
* ``merge``: ``jlora.checkpoint.merge_checkpoint(base, adapter, out)`` (default group size);
* ``merge + progress``: the same with ``progress=True`` (tqdm, output to /dev/null);
* ``merge, checks off``: the merge with ``check_finite=False, base_digest=False``: no NaN/Inf
  scan and no SHA-256 digest of the base, the same work as orbax's restore + save plus the
  leaf merges, so the row shows what the checks cost and what the I/O path alone reaches;
* ``merge, MALLOC_MMAP_THRESHOLD_=1 MiB`` (``--malloc``): the merge with glibc returning large
  freed buffers at once, as the ``jlora merge`` command line runs it.

* ``merge, before`` (``--baseline DIR``): the merge of the jlora checked out at ``DIR`` (the
  ``jlora`` package's parent), to compare two versions in one run.

Each subprocess reports its wall time, its CPU time (user + system, all threads, imports
included), its peak RSS (``VmHWM``) and how far the peak rose above the resident size once the
runtime had started (``rise``; for a merge, less the largest group of base leaves it held: the
part of the peak that is not the group); the table gives medians (the largest rise), MB/s of array
bytes and the ratios to orbax (speed: orbax's time over the mode's). Run it pinned (``taskset -c 1``) on a shared machine and read the CPU
ratios; the wall ones move with the load. Every file is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import time

LAYOUTS = {  # name -> (dtype, leaves, shape)
    "float32, many leaves (1024 x 1 MiB)": ("float32", 1024, (512, 512)),
    "float32, few leaves (8 x 128 MiB)": ("float32", 8, (8192, 4096)),
    "bfloat16, many leaves (2048 x 512 KiB)": ("bfloat16", 2048, (512, 512)),
    "bfloat16, few leaves (8 x 128 MiB)": ("bfloat16", 8, (16384, 4096)),
}


MALLOC = "merge, MALLOC_MMAP_THRESHOLD_=1 MiB"
CHECKS_OFF = "merge, checks off"
BEFORE = "merge, before (--baseline)"
REPO = pathlib.Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    """A size from ``/proc/self/status`` in bytes (``VmHWM``: peak resident, ``VmRSS``: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def prepare(work: pathlib.Path, dtype: str, leaves: int, shape: tuple[int, int]) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    import jlora
    import jlora.checkpoint

    rng = np.random.default_rng(0)
    params = {
        f"layer_{i:04d}": {"kernel": jnp.asarray(rng.standard_normal(shape, np.float32), dtype)}
        for i in range(leaves)
    }
    config = jlora.LoraConfig(targets=".*kernel", rank=8, alpha=16.0)
    adapters = jlora.init(jax.random.key(1), params, config)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # b != 0: the merge does real work
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(work / "base", params)
    jlora.checkpoint.save(work / "adapter", adapters, config, base=params)


def run(work: pathlib.Path, mode: str, group_bytes: int) -> dict:
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    import jlora.checkpoint

    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    jnp.ones(3).block_until_ready()  # the runtime started: what every mode holds before its work
    resident = _status("VmRSS")
    start = time.perf_counter()
    group = 0
    if mode == "orbax":
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(work / "base")
            checkpointer.save(out, tree)
        nbytes = sum(x.nbytes for x in __import__("jax").tree.leaves(tree))
    else:
        with open(os.devnull, "w") as sink:
            stderr, sys.stderr = sys.stderr, sink
            try:
                checks = mode != CHECKS_OFF
                summary = jlora.checkpoint.merge_checkpoint(
                    work / "base", work / "adapter", out, progress=mode == "merge + progress",
                    check_finite=checks, base_digest=checks, group_bytes=group_bytes,
                )
            finally:
                sys.stderr = stderr
        nbytes, group = summary.nbytes, summary.peak_group_bytes
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": time.perf_counter() - start,
        "cpu": usage.ru_utime + usage.ru_stime,  # the whole process, every thread
        "bytes": nbytes,
        "peak_rss": _status("VmHWM"),
        "growth": _status("VmHWM") - resident,  # the peak's rise during the work
        "group": group,  # the largest group of base leaves the merge held
        "jlora": jlora_file(),
    }


def jlora_file() -> str:
    import jlora

    return jlora.__file__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/jlora-ckpt-bench")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layouts", default="all", help="comma-separated indices, or 'all'")
    parser.add_argument("--malloc", action="store_true", help="add the MALLOC_MMAP_THRESHOLD_ run")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="fraction of each layout's leaves (0.25: 256 MiB)"
    )
    parser.add_argument(
        "--baseline", default=None, help="a checkout of another jlora: adds its merge as a mode"
    )
    parser.add_argument(
        "--group-mib", type=int, default=128, help="the merge's group_bytes, in MiB (default 128)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = pathlib.Path(args.dir)
    names = list(LAYOUTS)
    if args.layouts != "all":
        names = [names[int(i)] for i in args.layouts.split(",")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}  # this checkout's jlora
    me = str(pathlib.Path(__file__).resolve())
    lines = []
    loads = [os.getloadavg()[0]]
    try:
        for name in names:
            dtype, leaves, shape = LAYOUTS[name]
            leaves = max(1, round(leaves * args.scale))
            work = root / name.split(",")[0] / str(leaves)
            work.mkdir(parents=True, exist_ok=True)
            print(f"preparing {name}", file=sys.stderr, flush=True)
            spec = json.dumps([dtype, leaves, list(shape)])
            subprocess.run([sys.executable, me, "--prepare", str(work), spec], env=env, check=True)
            modes = ["orbax", "merge", CHECKS_OFF, "merge + progress"] + [MALLOC] * args.malloc
            modes += [BEFORE] * bool(args.baseline)
            results: dict[str, list[dict]] = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode in results:
                    extra = {"MALLOC_MMAP_THRESHOLD_": "1048576"} if mode == MALLOC else {}
                    if mode == BEFORE:
                        extra = {"PYTHONPATH": str(pathlib.Path(args.baseline).resolve())}
                    done = subprocess.run(
                        [sys.executable, me, "--run", str(work), mode, str(args.group_mib << 20)],
                        env={**env, **extra}, check=True, capture_output=True, text=True,
                    )
                    results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"  {mode}: {results[mode][-1]}", file=sys.stderr, flush=True)
            orbax_s = statistics.median(r["seconds"] for r in results["orbax"])
            orbax_cpu = statistics.median(r["cpu"] for r in results["orbax"])
            for mode, rs in results.items():
                s = statistics.median(r["seconds"] for r in rs)
                cpu = statistics.median(r["cpu"] for r in rs)
                nbytes = rs[0]["bytes"]
                rss = max(r["peak_rss"] for r in rs)
                growth = max(r["growth"] for r in rs)
                over = "" if mode == "orbax" else f"{(growth - rs[0]['group']) / 2**20:.0f}"
                lines.append(
                    f"| {name} | {mode} | {s:.2f} | {cpu:.2f} | {nbytes / s / 1e6:.0f} | "
                    f"{orbax_s / s:.2f} | {orbax_cpu / cpu:.2f} | {rss / 2**20:.0f} | "
                    f"{growth / 2**20:.0f} | {over} |"
                )
            shutil.rmtree(work)
            loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import jax
    import orbax.checkpoint as ocp

    report = "\n".join(
        [
            f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}; {os.cpu_count()} cores; "
            f"disk {root}; --scale {args.scale:g} of each layout's leaves; groups of "
            f"{args.group_mib} MiB; median of "
            f"{args.rounds} alternating rounds, each in a fresh process; "
            f"load average (1 min) {', '.join(f'{x:.1f}' for x in loads)} (start, after each "
            "layout).",
            "",
            "| layout | what | wall s | CPU s | MB/s (wall) | x orbax (wall) | x orbax (CPU) | "
            "peak RSS MiB | rise MiB | rise - largest group MiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *lines,
        ]
    )
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--prepare":
        dtype, leaves, shape = json.loads(sys.argv[3])
        prepare(pathlib.Path(sys.argv[2]), dtype, leaves, tuple(shape))
    elif len(sys.argv) > 1 and sys.argv[1] == "--run":
        print(json.dumps(run(pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
    else:
        main()
