"""LoRA dropout's cost in the train step: jlora's mask against the same mask with other hashes.

``python benchmarks/dropout.py --steps 15 --out benchmarks/results/dropout-cpu.md`` times, on the
benchmark decoder (``run.py``'s cpu preset; pinned to one core, CPU time, interleaved rounds, see
``timing.py``), the jlora Adam step for each target set (all linear; q, v):

* ``no dropout``: ``LoraConfig(dropout=0)``;
* ``dropout 0.1``: ``LoraConfig(dropout=0.1)``, ``apply(..., lora_train=True)``: jlora's mask
  (16 bits per element, four elements per ``mix64`` hash, a 4-round Feistel network:
  ``jlora/_mask.py``);
* ``dropout 0.1, threefry 20``: the same mask with Threefry-2x32 (20 rounds, jax's hash; the
  mask until session 7) in place of ``mix64``; ``threefry 13`` (all linear only) with 13 rounds,
  the fewest Salmon et al. (2011) report as Crush-resistant;
* ``dropout 0.1, no hash`` (all linear only; a diagnostic, not a valid mask): the same step with
  the keep bits taken from a multiplicative counter hash of one key word instead, so the
  difference to ``dropout 0.1`` is what the hash costs beyond the dropout passes.

The dropout key is an argument of the compiled step (a constant key would let XLA fold the
mask), and the frozen-base *floor* runs in the same rounds. Ratios are to ``no dropout`` of
the same targets.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import steps as train  # noqa: E402
from decoder import Decoder, Size, next_token_loss  # noqa: E402
from timing import JaxCase, run_rounds  # noqa: E402

import jlora  # noqa: E402
import jlora.linen  # noqa: E402
from jlora import _mask  # noqa: E402

RATE = 0.1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2, rounds=20):
    """Threefry-2x32 with ``rounds`` rounds, unrolled (20: the same words as ``jax.random``'s)."""
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(rounds):
        r = _ROTATIONS[(i // 4) % 2][i % 4]
        x1 = x1 + x2
        x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
        if i % 4 == 3:
            step = i // 4
            x1 = x1 + ks[(step + 1) % 3]
            x2 = x2 + ks[(step + 2) % 3] + jnp.uint32(step + 1)
    return x1, x2


def threefry_mask(rounds):
    """jlora's mask with Threefry-2x32 of ``rounds`` rounds as the hash."""

    def keep_mask(rng, rate, shape):
        k1, k2 = jax.random.bits(rng, (2,), jnp.uint32)
        hash_fn = functools.partial(threefry2x32, rounds=rounds)
        return _mask.keep_from_words(k1, k2, rate, shape, hash_fn)

    return keep_mask


def no_hash_mask(rng, rate, shape):
    """Diagnostic only: keep bits from ``counter * key`` (not independent draws; never use)."""
    k = jax.random.bits(rng, (), jnp.uint32)
    count = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        count = count + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return ((count * k) >> 16) & jnp.uint32(0xFFFF) < _mask.threshold(rate)


def dropout_step(lora, tx):
    def loss_fn(adapters, params, tokens, key):
        logits = lora.apply(params, adapters, tokens, rngs={"dropout": key}, lora_train=True)
        return next_token_loss(logits, tokens)

    def step(adapters, opt_state, params, tokens, key):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, params, tokens, key)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def cases(size: Size) -> list[JaxCase]:
    model = Decoder(size, jnp.float32)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (size.batch, size.seq), 0, size.vocab)
    params = model.init(key, tokens)["params"]
    tx = optax.adam(1e-3)
    out = []
    floor = train.build(
        model, size, jnp.float32, rank=8, alpha=16.0, remat="off", remat_policy="dots", peers={}
    )["cases"]["floor"]
    out.append(JaxCase("floor", floor[0], floor[1], carry=0, loss_index=None))
    for label, targets in train.TARGETS.items():
        plain = jlora.linen.lora(model, jlora.LoraConfig(targets=targets, rank=8, alpha=16.0))
        adapters = plain.init_adapters(jax.random.key(1), params, tokens)

        def loss_fn(adapters, params, tokens, plain=plain):
            return next_token_loss(plain.apply(params, adapters, tokens), tokens)

        args = (train._copy(adapters), tx.init(adapters), params, tokens)
        log(f"compiling {label}")
        out.append(
            JaxCase(f"{label}: no dropout", train.adapter_step(loss_fn, tx), args, carry=2,
                    loss_index=2)
        )
        config = jlora.LoraConfig(targets=targets, rank=8, alpha=16.0, dropout=RATE)
        dropped = jlora.linen.lora(model, config)
        args = (train._copy(adapters), tx.init(adapters), params, tokens, jax.random.key(7))
        out.append(
            JaxCase(f"{label}: dropout {RATE}", dropout_step(dropped, tx), args, carry=2,
                    loss_index=2)
        )
        variants = {"threefry 20": threefry_mask(20)}
        if label == "all linear":
            variants["threefry 13"] = threefry_mask(13)
            variants["no hash"] = no_hash_mask
        for name, mask in variants.items():
            args = (train._copy(adapters), tx.init(adapters), params, tokens, jax.random.key(7))
            new_mask = _mask.keep_mask
            _mask.keep_mask = mask  # traced (and compiled) while patched
            try:
                out.append(
                    JaxCase(f"{label}: dropout {RATE}, {name}", dropout_step(dropped, tx), args,
                            carry=2, loss_index=2)
                )
            finally:
                _mask.keep_mask = new_mask
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    size = Size(vocab=512, d_model=512, heads=8, layers=4, seq=128, batch=4)
    built = cases(size)
    load_before = os.getloadavg()[0]
    rows = {r.name: r for r in run_rounds(built, steps=args.steps, warmup=args.warmup, log=log)}
    load_after = os.getloadavg()[0]
    lines = [
        f"jax {jax.__version__}, {size}, float32, r=8, LoRA dropout {RATE}; median of "
        f"{args.steps} interleaved rounds after {args.warmup} warm-up; CPU time, pinned to 1 core; "
        f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after, "
        f"{os.cpu_count()} cores.",
        "",
        "| step | cpu ms | x no dropout | x floor | XLA memory MiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    floor = rows["floor"].cpu
    for name, r in rows.items():
        label = name.split(":")[0]
        ref = rows.get(f"{label}: no dropout")
        ratio = f"{r.cpu / ref.cpu:.3f}" if ref is not None else ""
        mem = "" if r.memory_bytes is None else f"{r.memory_bytes / 2**20:.1f}"
        lines.append(f"| {name} | {1e3 * r.cpu:.1f} | {ratio} | {r.cpu / floor:.3f} | {mem} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
