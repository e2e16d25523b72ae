"""Compile and set-up time: the adapted step's compile against the frozen step's, and set-up.

``python benchmarks/setup_time.py --out benchmarks/results/setup-time-cpu.md`` measures (pinned to
one core; process CPU time, medians of ``--repeats`` interleaved repeats, each a fresh ``jax.jit``
of a fresh function so no cache answers):

* the compile of each step split into its phases: tracing (``jax.jit(f).trace``), lowering
  (``.lower()``) and XLA's compile (``.compile()``), with the jaxpr's equation count (nested
  jaxprs included) and the HLO instruction counts before and after XLA's optimisation. Steps: the
  benchmark decoder's *floor* (frozen base, gradient for the activations only), the jlora
  all-linear Adam step, its gradient alone, the same Adam update alone over the 48 factor leaves,
  the full fine-tune, and a hand-written pure-JAX twin (``hand_lora.py``: its floor and its
  plain-autodiff factored LoRA Adam step), which is what any LoRA costs;
* ``jlora.linen.lora(model, config).init_adapters(...)`` and ``jlora.nnx.lora(model, config)``
  CPU time on the decoder at 2, 4, 8 and 16 layers (d_model 128: set-up cost, not arithmetic),
  both the first call of a fresh process (a subprocess per size) and the median warm call;
* ``jax.eval_shape`` of ``jlora.init`` on an abstract Llama-70B-shaped tree (80 layers, all seven
  linears, r=16): no array is allocated, so this is jlora's own per-leaf overhead.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false"
).strip()

import decoder_nnx  # noqa: E402
import hand_lora  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import steps as train  # noqa: E402
from decoder import Decoder, Size, next_token_loss  # noqa: E402
from flax import nnx  # noqa: E402

import jlora  # noqa: E402
import jlora.linen  # noqa: E402
import jlora.nnx  # noqa: E402

LAYERS = (2, 4, 8, 16)


def _eqns(jaxpr) -> int:
    """Equations of a jaxpr, the bodies of nested jaxprs (jit, custom VJP, remat) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _eqns(inner)
    return n


def _instructions(hlo: str) -> int:
    return sum(1 for line in hlo.splitlines() if " = " in line and "HloModule" not in line)


def _cases(model: Decoder, size: Size) -> dict:
    """Fresh ``name -> (jitted, args)`` (jax's caches are keyed by function identity)."""
    built = train.build(
        model, size, jnp.float32, rank=8, alpha=16.0, remat="off", remat_policy="dots", peers={}
    )
    cases = {k: built["cases"][k][:2] for k in ("floor", "jlora (all linear)", "full")}
    params, tokens = built["params"], built["tokens"]
    step, (adapters, opt_state, *_) = cases["jlora (all linear)"]
    lora = jlora.linen.lora(model, jlora.LoraConfig(targets=train.ALL_LINEAR, rank=8, alpha=16.0))

    def lora_loss(adapters, params, tokens):
        return next_token_loss(lora.apply(params, adapters, tokens), tokens)

    tx = optax.adam(1e-3)

    def adam(trainable, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    def hand_floor(params, tokens):
        h0 = jnp.zeros((*tokens.shape, size.d_model), jnp.float32)
        return jax.value_and_grad(lambda h: next_token_loss(
            hand_lora.apply(size, params, None, tokens, 2.0, h), tokens))(h0)

    def hand_loss(lora, params, tokens):
        return next_token_loss(hand_lora.apply(size, params, lora, tokens, 2.0), tokens)

    hand = hand_lora.adapters(size, 8)
    cases["jlora gradient only"] = (
        jax.jit(jax.value_and_grad(lora_loss)), (adapters, params, tokens)
    )
    cases["Adam alone (48 factor leaves)"] = (jax.jit(adam), (adapters, opt_state, adapters))
    cases["hand floor (pure JAX)"] = (jax.jit(hand_floor), (params, tokens))
    cases["hand LoRA (pure JAX, Adam)"] = (
        train.adapter_step(hand_loss, tx), (hand, tx.init(hand), params, tokens)
    )
    return cases


def compile_phases(size: Size, repeats: int) -> dict[str, dict]:
    """Per step: median CPU seconds of trace, lower and compile, and the program's sizes."""
    model = Decoder(size, jnp.float32)
    out: dict[str, dict] = {}
    for _ in range(repeats):
        for name, (jitted, args) in _cases(model, size).items():
            c0 = time.process_time()
            traced = jitted.trace(*args)
            c1 = time.process_time()
            lowered = traced.lower()
            c2 = time.process_time()
            compiled = lowered.compile()
            c3 = time.process_time()
            row = out.setdefault(name, {"times": []})
            row["times"].append((c1 - c0, c2 - c1, c3 - c2))
            if "eqns" not in row:
                post = compiled.as_text()
                row["eqns"] = _eqns(traced.jaxpr.jaxpr)
                row["hlo"] = _instructions(lowered.as_text(dialect="hlo"))
                row["post"] = _instructions(post)
                row["dots"] = post.count(" dot(")
    for row in out.values():
        row["phases"] = [statistics.median(t[i] for t in row["times"]) for i in range(3)]
    return out


def _setup_calls(which: str, layers: int, calls: int) -> list[float]:
    """CPU seconds of ``calls`` successive set-up calls on a fresh decoder of ``layers`` blocks."""
    size = Size(vocab=512, d_model=128, heads=4, layers=layers, seq=32, batch=2)
    tokens = jnp.zeros((size.batch, size.seq), jnp.int32)
    times = []
    if which == "linen":
        model = Decoder(size, jnp.float32)
        params = model.init(jax.random.key(0), tokens)["params"]
        config = jlora.LoraConfig(targets=train.ALL_LINEAR, rank=8, alpha=16.0)
        for _ in range(calls):
            lora = jlora.linen.lora(model, config)
            c0 = time.process_time()
            jax.block_until_ready(lora.init_adapters(jax.random.key(1), params, tokens))
            times.append(time.process_time() - c0)
    else:
        config = jlora.LoraConfig(
            targets=r".*(query|key|value|out|up|down)/kernel", rank=8, alpha=16.0
        )
        for _ in range(calls):
            # A fresh module each call: jlora.nnx.lora adapts the module it is given in place.
            net = decoder_nnx.Decoder(size, jnp.float32, lora=(), rank=8, rngs=nnx.Rngs(0))
            c0 = time.process_time()
            jlora.nnx.lora(net, config, rngs=0)
            times.append(time.process_time() - c0)
    return times


def setup_times(repeats: int) -> list[tuple]:
    """``(layers, linen first, linen warm, nnx first, nnx warm)`` CPU seconds per model size.

    *first* is the first call of a fresh process (a subprocess, jax imported but nothing traced);
    *warm* the median of ``repeats`` later calls in this process.
    """
    rows = []
    for layers in LAYERS:
        row: list = [layers]
        for which in ("linen", "nnx"):
            first = subprocess.run(
                [sys.executable, __file__, "--first", which, str(layers)],
                check=True, capture_output=True, text=True, cwd=os.path.dirname(__file__) or ".",
            ).stdout.split()[-1]
            warm = _setup_calls(which, layers, repeats + 1)[1:]
            row += [float(first), statistics.median(warm)]
        rows.append(tuple(row))
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
    parser.add_argument("--first", nargs=2, metavar=("KIND", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first:
        print(_setup_calls(args.first[0], int(args.first[1]), 1)[0])
        return
    loads = [os.getloadavg()[0]]
    size = Size(vocab=512, d_model=512, heads=8, layers=4, seq=128, batch=4)
    comp = compile_phases(size, args.repeats)
    loads.append(os.getloadavg()[0])
    setup = setup_times(args.repeats)
    s70, n70 = init_70b(args.repeats)
    loads.append(os.getloadavg()[0])
    floor = sum(comp["floor"]["phases"])
    hand_floor = sum(comp["hand floor (pure JAX)"]["phases"])
    lines = [
        f"jax {jax.__version__}; {os.cpu_count()} cores, pinned to 1; CPU-time medians of "
        f"{args.repeats} interleaved repeats; load average (1 min) "
        f"{', '.join(f'{x:.1f}' for x in loads)} (start, after compiles, end).",
        "",
        f"Compile phases, CPU seconds, {size}:",
        "",
        "| step | trace | lower | XLA compile | total | x floor | x hand floor | jaxpr eqns "
        "| HLO instr. | after opt. | dots |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {k} | {r['phases'][0]:.3f} | {r['phases'][1]:.3f} | {r['phases'][2]:.3f} "
            f"| {sum(r['phases']):.3f} | {sum(r['phases']) / floor:.2f} "
            f"| {sum(r['phases']) / hand_floor:.2f} | {r['eqns']} | {r['hlo']} | {r['post']} "
            f"| {r['dots']} |"
            for k, r in comp.items()
        ),
        "",
        "Adapter set-up (d_model 128, all six linears, r=8), CPU seconds:",
        "",
        "| layers | linen init_adapters, first | warm | warm per layer (ms) "
        "| jlora.nnx.lora, first | warm | warm per layer (ms) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {n} | {a:.3f} | {b:.3f} | {1e3 * b / n:.1f} | {c:.3f} | {d:.3f} "
            f"| {1e3 * d / n:.1f} |"
            for n, a, b, c, d in setup
        ),
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
