"""QLoRA on the benchmark decoder: base weight bytes and LoRA step time vs a bf16 base (CPU ratios).

    .venv/bin/python -m benchmarks.quant [--d-model 256 --layers 2 --steps 10]
    .venv/bin/python -m benchmarks.quant --memory   # temporaries: whole vs block-wise dequantise

Quantises the decoder's Dense kernels (query/key/value/out/up/down; the tied embedding stays
bf16) to NF4 with double quantisation and to int8, and times one jitted LoRA train step (loss,
gradients of the factors, plain SGD update) over each base against the same step over the bf16
base, interleaved round by round. Reports bytes of the quantised kernels against their bf16 bytes,
the step-time ratio, and XLA's memory account of each compiled step (arguments + temporaries).
On CPU the dequantisation is extra work per step; the point of the bytes is accelerator memory.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.linen
import jlora.quant as jq
from benchmarks.decoder import Decoder, Size, next_token_loss
from benchmarks.timing import memory_bytes

TARGETS = ".*/(query|key|value|out|up|down)/kernel"


class MLP(nn.Module):
    """``layers`` tanh Dense layers of ``width`` (the memory case of docs/design.md)."""

    layers: int = 8
    width: int = 512
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = nn.tanh(nn.Dense(self.width, dtype=self.dtype)(x))
        return x


def whole_weights():
    """The adapted layers dequantise their kernel whole (the metadata-box route, as before)."""
    return mock.patch("jlora.linen._intercept.linen_base", lambda *a, **k: None)


def temporaries(model, params, inputs, loss, config, route) -> tuple[float, float]:
    """``(arguments, temporaries)`` MiB of XLA's account of one compiled LoRA grad step."""
    adapted = jlora.linen.lora(model, config)
    adapters = adapted.init_adapters(jax.random.key(1), jq.abstract(params), inputs)
    with route():
        step = jax.jit(jax.grad(lambda a, p, x: loss(adapted.apply(p, a, x), x)))
        stats = step.lower(adapters, params, inputs).compile().memory_analysis()
    return stats.argument_size_in_bytes / 2**20, stats.temp_size_in_bytes / 2**20


def memory(args) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory", action="store_true", help="the temporaries table only")
    args = parser.parse_args()
    if args.memory:
        memory(args)
        return
    size = Size(
        vocab=512, d_model=args.d_model, heads=4, layers=args.layers, seq=args.seq, batch=args.batch
    )
    model = Decoder(size, dtype=jnp.bfloat16)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, size.vocab, (size.batch, size.seq)))
    params = jax.tree.map(
        lambda w: w.astype(jnp.bfloat16), model.init(jax.random.key(0), tokens)["params"]
    )
    config = jlora.LoraConfig(targets=TARGETS, rank=8)
    adapted = jlora.linen.lora(model, config)
    adapters = adapted.init_adapters(jax.random.key(1), params, tokens)
    bases = {
        "bf16": params,
        "nf4+dq": jq.quantize(params, config, kind="nf4"),
        "int8": jq.quantize(params, config, kind="int8"),
    }

    def step(adapters, base, tokens):
        def loss(a):
            return next_token_loss(adapted.apply(base, a, tokens), tokens)

        value, grads = jax.value_and_grad(loss)(adapters)
        return jax.tree.map(lambda p, g: p - 0.01 * g, adapters, grads), value

    kernel_bytes = {}
    for name, base in bases.items():
        flat = jlora._paths.leaves_with_paths(
            base, is_leaf=lambda x: isinstance(x, jq.QuantizedWeight)
        )
        kernel_bytes[name] = sum(jq.nbytes(leaf) for path, leaf in flat if config.selects(path))
    compiled = {
        name: jax.jit(step).lower(adapters, base, tokens).compile() for name, base in bases.items()
    }
    times: dict[str, list[float]] = {name: [] for name in bases}
    for i in range(args.steps + 2):
        for name, base in bases.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](adapters, base, tokens))
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    ref_t = statistics.median(times["bf16"])
    print(
        f"decoder d_model={size.d_model} layers={size.layers} seq={size.seq} batch={size.batch}, "
        f"rank 8 on {TARGETS}; {jax.devices()[0].platform}, median of {args.steps} steps"
    )
    print(
        f"{'base':8} {'kernel bytes':>13} {'x bf16':>7} {'step x bf16':>12} {'XLA memory MiB':>15}"
    )
    for name in bases:
        mem = memory_bytes(compiled[name])
        print(
            f"{name:8} {kernel_bytes[name]:13d} {kernel_bytes[name] / kernel_bytes['bf16']:7.3f} "
            f"{statistics.median(times[name]) / ref_t:12.2f} "
            f"{'' if mem is None else f'{mem / 2**20:15.1f}'}"
        )


if __name__ == "__main__":
    main()
