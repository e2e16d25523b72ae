"""LoRA dropout's cost in the train step: jlora's mask against ``jax.random.bernoulli``'s.

``python benchmarks/dropout.py --steps 15 --out benchmarks/results/dropout-cpu.md`` times, on the
benchmark decoder (``run.py``'s cpu preset; pinned to one core, CPU time, interleaved rounds, see
``timing.py``), the jlora Adam step for each target set (all linear; q, v):

* ``no dropout``: ``LoraConfig(dropout=0)``;
* ``dropout 0.1``: ``LoraConfig(dropout=0.1)``, ``apply(..., lora_train=True)``: jlora's mask
  (16 bits per element, four elements per Threefry hash, integer compares: ``jlora/_mask.py``);
* ``dropout 0.1, bernoulli``: the same step with the mask drawn as before, by
  ``jax.random.bernoulli(key, 1 - rate, shape)`` (one hash per element, float compares).
* ``dropout 0.1, no hash`` (all linear only; a diagnostic, not a valid mask): the same step with
  the keep bits taken from a multiplicative counter hash of one key word instead of Threefry, so
  the difference to ``dropout 0.1`` is what the Threefry mask costs beyond the dropout passes.

The dropout key is an argument of the compiled step (a constant key would let XLA fold the
mask), and the frozen-base *floor* runs in the same rounds. Ratios are to ``no dropout`` of
the same targets.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false"
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


def bernoulli_mask(rng, rate, shape):
    """The mask before this benchmark's change: one Threefry hash and a float compare per entry."""
    return jax.random.bernoulli(rng, 1.0 - rate, shape)


def strided_mask(rng, rate, shape):
    """Session 5's mask: the same hashes and pieces, entry j of a row taking piece j // w of hash
    j % w (w hashes a row) instead of piece j % 4 of hash j // 4; its unpacking did not vectorise."""
    lead, last = shape[:-1], shape[-1]
    words = -(-last // 4)
    hi, lo = _mask._counters((*lead, words))
    k1, k2 = jax.random.bits(rng, (2,), jnp.uint32)
    w1, w2 = _mask.threefry2x32(k1, k2, hi, lo)
    t = _mask.threshold(rate)
    packed = jnp.zeros(w1.shape, jnp.uint32)
    for i, piece in enumerate(w >> jnp.uint32(16 * j) for w in (w1, w2) for j in range(2)):
        packed = packed | ((piece & jnp.uint32(0xFFFF)) < t).astype(jnp.uint32) << jnp.uint32(i)
    packed = packed % jnp.uint32(17)
    shift = jax.lax.broadcasted_iota(jnp.uint32, (*lead, 4, words), len(lead))
    bits = (jnp.broadcast_to(packed[..., None, :], shift.shape) >> shift) & jnp.uint32(1)
    keep = bits.reshape(*lead, 4 * words) != 0
    return keep[..., :last]


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
        variants = {"bernoulli": bernoulli_mask, "session 5 layout": strided_mask}
        if label == "all linear":
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
