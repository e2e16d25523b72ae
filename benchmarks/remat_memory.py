"""Memory below the floor: what per-block recomputation saves for jlora on XLA:CPU, and why.

``python benchmarks/remat_memory.py --steps 10 --out benchmarks/results/remat-memory-cpu.md`` times,
on the benchmark decoder (``run.py``'s cpu preset; pinned to one core, CPU time, interleaved rounds,
see ``timing.py``), the frozen-base *floor* and the jlora Adam step on all linears and on q, v:
plain, and with every block under ``nn.remat`` with ``dots_with_no_batch_dims_saveable`` (*remat
dots*), ``nothing_saveable`` (*remat nothing*) or ``jlora.remat_policy()`` (*remat jlora*), the
blocks either a Python loop or one ``nn.scan`` (*scan*; its parameters are the loop's, stacked, so
the step computes the same function of the same weights). For each it reports XLA's memory account
(``compiled.memory_analysis()``: ``timing.memory_bytes`` and the temporaries alone) and the
activations jax's autodiff keeps for the backward pass (``jax.ad_checkpoint.saved_residuals``:
the count and bytes of saved values that are not arguments), and each step's first loss (b = 0,
so every adapter row computes the frozen decoder's loss: the same function in every row).

The *jlora nnx* rows are the same decoder in flax.nnx (``decoder_nnx.py``, the Linen weights
copied in), adapted by ``jlora.nnx.lora``: its blocks a Python loop (``decoder_nnx.Decoder``), or
stacked by ``nnx.vmap`` and run by one ``nnx.scan``, each under
``nnx.remat(policy=jlora.remat_policy())`` (``decoder_nnx.ScannedDecoder``). Their step is the
same Adam step over the ``jlora.nnx.LoraParam`` arrays, the model rebuilt by ``nnx.merge`` inside
the loss.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import pathlib
import sys

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false"
).strip()

import jax  # noqa: E402
import decoder_nnx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import steps as train  # noqa: E402
from decoder import Decoder, Size, next_token_loss  # noqa: E402
from flax import nnx  # noqa: E402
from timing import JaxCase, run_rounds  # noqa: E402

import jlora  # noqa: E402
import jlora.linen  # noqa: E402
import jlora.nnx  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _saved_mib(loss_fn, *args) -> tuple[int, float]:
    """Saved residuals of ``loss_fn``'s gradient in its first argument that are not arguments."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        jax.ad_checkpoint.print_saved_residuals(loss_fn, *args)
    kept = [line.split()[0] for line in buffer.getvalue().splitlines()]
    kept = [k for k, line in zip(kept, buffer.getvalue().splitlines(), strict=True)
            if "from the argument" not in line and "a constant" not in line]
    total = 0
    for spec in kept:  # e.g. f32[4,128,512]
        dtype, dims = spec.split("[")
        dims = [int(d) for d in dims.rstrip("]").split(",") if d]
        total += math.prod(dims) * jnp.dtype({"f32": "float32", "bf16": "bfloat16"}.get(
            dtype, "float32")).itemsize
    return len(kept), total / 2**20


def _stacked(tree: dict) -> dict:
    """The loop decoder's ``layers_i`` entries stacked under ``layers/block``, as ``nn.scan`` keeps them."""
    layers = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k[7:]))
    out = {k: v for k, v in tree.items() if k not in layers}
    out["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[k] for k in layers))}
    return out


def cases(size: Size) -> tuple[list[JaxCase], dict[str, tuple[int, float]]]:
    model = Decoder(size, jnp.float32)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (size.batch, size.seq), 0, size.vocab)
    params = model.init(key, tokens)["params"]
    tx = optax.adam(1e-3)
    floor = train.build(
        model, size, jnp.float32, rank=8, alpha=16.0, remat="off", remat_policy="dots", peers={}
    )["cases"]["floor"]
    out = [JaxCase("floor", floor[0], floor[1], carry=0, loss_index=None)]
    saved = {}
    for label, targets in train.TARGETS.items():
        config = jlora.LoraConfig(targets=targets, rank=8, alpha=16.0)
        adapters = jlora.linen.lora(model, config).init_adapters(jax.random.key(1), params, tokens)
        variants = [("", None, False), (", remat dots", "dots", False)]
        if label == "all linear":
            variants += [(", remat nothing", "nothing", False), (", scan, remat dots", "dots", True),
                         (", scan, remat nothing", "nothing", True)]
        variants += [(", scan, remat jlora", "jlora", True)]
        for suffix, remat, scan in variants:
            lora = jlora.linen.lora(dataclasses.replace(model, remat=remat, scan=scan), config)
            used = _stacked(adapters) if scan else adapters
            frozen = _stacked(params) if scan else params

            def loss_fn(adapters, params, tokens, lora=lora):
                return next_token_loss(lora.apply(params, adapters, tokens), tokens)

            name = f"jlora ({label}{suffix})"
            log(f"compiling {name}")
            saved[name] = _saved_mib(loss_fn, used, frozen, tokens)
            args = (train._copy(used), tx.init(used), frozen, tokens)
            out.append(JaxCase(name, train.adapter_step(loss_fn, tx), args, carry=2, loss_index=2))
    for label, targets in train.TARGETS.items():
        variants = [("", False)] if label == "all linear" else []
        for suffix, scan in [*variants, (", scan, remat jlora", True)]:
            name = f"jlora nnx ({label}{suffix})"
            log(f"compiling {name}")
            loss_fn, used, frozen = _nnx_loss(size, params, targets, scan)
            saved[name] = _saved_mib(loss_fn, used, frozen, tokens)
            args = (train._copy(used), tx.init(used), frozen, tokens)
            out.append(JaxCase(name, train.adapter_step(loss_fn, tx), args, carry=2, loss_index=2))
    return out, saved


def _nnx_loss(size: Size, params: dict, targets: str, scan: bool):
    """``(loss_fn, adapter arrays, frozen arrays)`` of the NNX decoder with these Linen weights.

    The states travel as lists of arrays and become ``nnx.State`` again inside the loss: an
    ``nnx.State`` unflattened by ``jax.value_and_grad`` (flax 0.12.8) holds Variables of another
    trace level, which ``nnx.scan`` refuses.
    """
    if scan:
        net = decoder_nnx.ScannedDecoder(
            size, jnp.float32, policy=jlora.remat_policy(), rngs=nnx.Rngs(0)
        )
        decoder_nnx.load_linen_params_stacked(net, params)
    else:
        net = decoder_nnx.Decoder(size, jnp.float32, rngs=nnx.Rngs(0))
        decoder_nnx.load_linen_params(net, params)
    net = jlora.nnx.lora(net, jlora.LoraConfig(targets=targets, rank=8, alpha=16.0), rngs=1)
    graphdef, lora_state, rest = nnx.split(net, jlora.nnx.LoraParam, ...)
    lora_def, rest_def = jax.tree.structure(lora_state), jax.tree.structure(rest)

    def loss_fn(adapters, frozen, tokens):
        model = nnx.merge(
            graphdef, jax.tree.unflatten(lora_def, adapters), jax.tree.unflatten(rest_def, frozen)
        )
        return next_token_loss(model(tokens), tokens)

    return loss_fn, jax.tree.leaves(lora_state), jax.tree.leaves(rest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    size = Size(vocab=512, d_model=512, heads=8, layers=4, seq=128, batch=4)
    built, saved = cases(size)
    temps = {c.name: c.compiled.memory_analysis().temp_size_in_bytes for c in built}
    load_before = os.getloadavg()[0]
    rows = run_rounds(built, steps=args.steps, warmup=args.warmup, log=log)
    load_after = os.getloadavg()[0]
    floor = rows[0]
    lines = [
        f"jax {jax.__version__}, {size}, float32, r=8; median of {args.steps} interleaved rounds "
        f"after {args.warmup} warm-up; CPU time, pinned to 1 core; load average (1 min) "
        f"{load_before:.1f} before, {load_after:.1f} after, {os.cpu_count()} cores.",
        "",
        "| step | cpu ms | x floor | XLA memory MiB | x floor memory | temporaries MiB "
        "| saved residuals (count, MiB) | first loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        count, mib = saved.get(r.name, (None, None))
        kept = "" if count is None else f"{count}, {mib:.1f}"
        loss = "" if r.loss is None else f"{r.loss:.6f}"
        lines.append(
            f"| {r.name} | {1e3 * r.cpu:.1f} | {r.cpu / floor.cpu:.3f} | "
            f"{r.memory_bytes / 2**20:.1f} | {r.memory_bytes / floor.memory_bytes:.2f} | "
            f"{temps[r.name] / 2**20:.1f} | {kept} | {loss} |"
        )
    report = "\n".join(lines)
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
