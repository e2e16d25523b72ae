"""Greedy decoding with a KV cache for a batch that mixes 16 adapters, in one jitted step.

A small GPT-style decoder (``flax.linen``: tied embedding, ``DenseGeneral`` attention with a
fixed-size KV cache passed in and returned, a Dense MLP) serves a batch of prompts in which every
row picks its own adapter from a :class:`jlora.serving.AdapterBank` of 16 (random adapters of
ranks 2 to 8 on the attention and MLP kernels and the embedding), plus rows that run the base
alone. One jitted ``step(params, factors, ids, token, cache, index)`` generates a token for every
row; it is compiled once and reused for every step (the index is traced) and would be reused for
other adapters put in the bank. The example checks that every row's tokens equal greedy decoding
with that row's adapter *alone*, merged into the base (``jlora.merge``), one adapter at a time, and
prints the throughput of the mixed batch against a batch that uses one adapter, in tokens/s of
CPU time (ratios are what carry over; the absolute figures are this machine's).

Run: ``.venv/bin/python examples/serving_decode.py`` (about 20 s on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora
import jlora.linen
from jlora.serving import AdapterBank, apply, gather

TARGETS = r".*(query|key|value|out|up|down)/kernel|embed/embedding"


@dataclasses.dataclass(frozen=True)
class Size:
    vocab: int = 96
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    prompt: int = 8
    steps: int = 16
    adapters: int = 16
    base_rows: int = 4

    @property
    def length(self) -> int:
        """The cache's size: the prompt and every generated token."""
        return self.prompt + self.steps


class Attention(nn.Module):
    """Causal self-attention over a fixed-size cache ``{"k", "v"}: (B, length, heads, head_dim)``;
    this call's keys and values are written at ``index`` (the position of its first token)."""

    size: Size

    @nn.compact
    def __call__(self, x, cache, index):
        heads, head_dim = self.size.heads, self.size.d_model // self.size.heads
        q, k, v = (nn.DenseGeneral((heads, head_dim), name=n)(x) for n in ("query", "key", "value"))
        start = (0, index, 0, 0)
        cache = {
            "k": jax.lax.dynamic_update_slice(cache["k"], k, start),
            "v": jax.lax.dynamic_update_slice(cache["v"], v, start),
        }
        positions = index + jnp.arange(x.shape[1])
        visible = jnp.arange(self.size.length)[None, :] <= positions[:, None]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, cache["k"]) / np.float32(np.sqrt(head_dim))
        logits = jnp.where(visible[None, None], logits, np.float32(-1e9))
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), cache["v"])
        return nn.DenseGeneral(self.size.d_model, axis=(-2, -1), name="out")(out), cache


class Block(nn.Module):
    size: Size

    @nn.compact
    def __call__(self, x, cache, index):
        h, cache = Attention(self.size, name="attn")(nn.LayerNorm(name="ln1")(x), cache, index)
        x = x + h
        h = nn.gelu(nn.Dense(4 * self.size.d_model, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(self.size.d_model, name="down")(h), cache


class Decoder(nn.Module):
    """Tokens ``(B, T)`` at positions ``index ..`` to logits ``(B, T, vocab)`` and the new cache."""

    size: Size

    @nn.compact
    def __call__(self, tokens, cache, index):
        embed = nn.Embed(self.size.vocab, self.size.d_model, name="embed")
        position = self.param(
            "position", nn.initializers.normal(0.02), (self.size.length, self.size.d_model)
        )
        x = embed(tokens) + jax.lax.dynamic_slice_in_dim(position, index, tokens.shape[1])[None]
        new = []
        for i in range(self.size.layers):
            x, layer_cache = Block(self.size, name=f"blocks_{i}")(x, cache[i], index)
            new.append(layer_cache)
        return embed.attend(nn.LayerNorm(name="ln")(x)), new


def init_cache(size: Size, batch: int) -> list[dict[str, jax.Array]]:
    shape = (batch, size.length, size.heads, size.d_model // size.heads)
    return [{"k": jnp.zeros(shape), "v": jnp.zeros(shape)} for _ in range(size.layers)]


Forward = Callable[..., tuple[jax.Array, Any]]  # (*state, tokens, cache, index) -> (logits, cache)


def decoder_step(forward: Forward, traces: list | None = None) -> Callable[..., Any]:
    """One jitted program: the next greedy token of every row, and the updated cache (each
    trace, i.e. compilation, appends to ``traces``)."""

    def step(*args):
        if traces is not None:
            traces.append(args[-3].shape)
        logits, cache = forward(*args)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    return jax.jit(step)


def generate(step: Callable, state: tuple, prompts: jax.Array, size: Size) -> np.ndarray:
    """Greedy tokens ``(B, steps)``: the prompt fills the cache in one call, then one call per
    token, each the same compiled program (``index`` is traced)."""
    cache = init_cache(size, prompts.shape[0])
    token, cache = step(*state, prompts, cache, jnp.int32(0))
    out = [token]
    for t in range(size.steps - 1):
        token, cache = step(*state, token[:, None], cache, jnp.int32(size.prompt + t))
        out.append(token)
    return np.asarray(jnp.stack(out, axis=1))


def make_adapters(model: Decoder, params: Any, size: Size, seed: int = 1) -> dict[str, Any]:
    """``size.adapters`` random adapters of ranks 2 to 8 (init has ``b = 0``: the base; random
    ``b`` makes each one a different model)."""
    tokens = jnp.zeros((1, size.prompt), jnp.int32)
    rng = np.random.default_rng(seed)
    adapters = {}
    for i in range(size.adapters):
        config = jlora.LoraConfig(targets=TARGETS, rank=2 + i % 7, alpha=8.0)
        lora = jlora.linen.lora(model, config)
        shapes = jax.eval_shape(
            lambda key, lora=lora: lora.init_adapters(key, params, tokens, init_cache(size, 1), 0),
            jax.random.key(i),
        )
        adapters[f"task{i}"] = jax.tree.map(
            lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes
        )
    return adapters


def setup(size: Size, seed: int = 0):
    """The model, its params, the adapters, the bank, the prompts and each row's adapter name."""
    model = Decoder(size)
    tokens = jnp.zeros((1, size.prompt), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(seed), tokens, init_cache(size, 1), 0)["params"]
    adapters = make_adapters(model, params, size, seed + 1)
    bank = AdapterBank.build(params, adapters, capacity=size.adapters)
    rng = np.random.default_rng(seed + 2)
    names = [*adapters, *[None] * size.base_rows]
    names = [names[i] for i in rng.permutation(len(names))]
    prompts = jnp.asarray(rng.integers(0, size.vocab, (len(names), size.prompt)), jnp.int32)
    return model, params, adapters, bank, prompts, names


def mixed_step(model: Decoder, traces: list | None = None, strategy: str = "gather") -> Callable:
    """``step(params, bank factors, ids, tokens, cache, index)``: every row its own adapter."""
    return decoder_step(
        lambda p, f, ids, *args: apply(model, p, f, ids, *args, strategy=strategy), traces
    )


def gathered_step(model: Decoder, traces: list | None = None) -> Callable:
    """``step(params, rows, tokens, cache, index)`` with ``rows = jlora.serving.gather(factors,
    ids)`` made once per sequence: the ids do not change while decoding, so no step gathers."""
    return decoder_step(lambda p, rows, *args: apply(model, p, rows, None, *args), traces)


def plain_step(model: Decoder) -> Callable:
    """``step(params, tokens, cache, index)``: the base, or a merged model."""
    return decoder_step(lambda p, *args: model.apply({"params": p}, *args))


def one_by_one(model, params, adapters, prompts, names, size) -> np.ndarray:
    """Each row generated alone (batch 1) by its adapter merged into the base, or the base."""
    step = plain_step(model)
    rows = []
    for e, name in enumerate(names):
        weights = params if name is None else jlora.merge(params, adapters[name])
        rows.append(generate(step, (weights,), prompts[e : e + 1], size)[0])
    return np.stack(rows)


def _cpu_seconds(run: Callable[[], Any], repeats: int) -> float:
    run()  # compiled and warm
    times = []
    for _ in range(repeats):
        start = time.process_time()
        jax.block_until_ready(run())
        times.append(time.process_time() - start)
    return float(np.median(times))


def throughput(model, params, adapters, bank, prompts, names, size, repeats=5) -> dict[str, float]:
    """Generated tokens per CPU second (prompt included): the mixed batch (two strategies, and
    each row's factors gathered once per sequence), the
    same batch with one adapter (factored through jlora.linen, and merged), the base, and one
    batch per adapter, merged (no mixing: what serving without a bank costs)."""
    ids = bank.ids(names)
    first = next(iter(adapters))
    lora = jlora.linen.lora(model, jlora.LoraConfig(targets=TARGETS, rank=2))
    single = decoder_step(lambda p, a, *args: lora.apply(p, a, *args))
    plain = plain_step(model)
    merged = jlora.merge(params, adapters[first])
    groups = {}  # adapter name: (its weights merged, its rows)
    for e, name in enumerate(names):
        weights = params if name is None else jlora.merge(params, adapters[name])
        groups.setdefault(name, (weights, []))[1].append(e)

    def separate():
        return [generate(plain, (w,), prompts[np.array(r)], size) for w, r in groups.values()]

    cases = {}
    for strategy in ("gather", "onehot"):
        mixed = mixed_step(model, strategy=strategy)
        cases[f"mixed batch, {strategy}"] = functools.partial(
            generate, mixed, (params, bank.factors, ids), prompts, size
        )
    rows = gather(bank.factors, ids)  # once per sequence: the ids are fixed while decoding
    cases["mixed batch, gathered once"] = functools.partial(
        generate, gathered_step(model), (params, rows), prompts, size
    )
    cases["one adapter, factored (jlora.linen)"] = functools.partial(
        generate, single, (params, adapters[first]), prompts, size
    )
    cases["one adapter, merged"] = functools.partial(generate, plain, (merged,), prompts, size)
    cases["base alone"] = functools.partial(generate, plain, (params,), prompts, size)
    cases["one batch per adapter, merged"] = separate
    tokens = prompts.shape[0] * size.steps
    return {name: tokens / _cpu_seconds(run, repeats) for name, run in cases.items()}


def main(argv: list[str] | None = None, size: Size | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="skip the throughput table")
    args = parser.parse_args(argv)
    size = size or Size()
    model, params, adapters, bank, prompts, names = setup(size)
    traces: list = []
    step = mixed_step(model, traces)
    ids = bank.ids(names)
    mixed = generate(step, (params, bank.factors, ids), prompts, size)
    print(f"{prompts.shape[0]} rows: {size.adapters} adapters in one bank, {size.base_rows} base")
    print(
        f"mixed step compiled {len(traces)} times (token shapes {traces}) for the prompt and "
        f"{size.steps - 1} decode steps"
    )
    once = generate(gathered_step(model), (params, gather(bank.factors, ids)), prompts, size)
    print(f"factors gathered once per sequence give the same tokens: {(once == mixed).all()}")
    alone = one_by_one(model, params, adapters, prompts, names, size)
    equal = (mixed == alone).all(axis=1)
    print(f"rows equal to their adapter alone (merged, batch 1): {int(equal.sum())}/{len(names)}")
    distinct = len({tuple(row) for row in mixed})
    print(f"distinct token sequences: {distinct} of {len(names)} rows")
    base_rows = [e for e, n in enumerate(names) if n is None]
    differs = [e for e, n in enumerate(names) if n is not None and (mixed[e] != alone[e]).any()]
    result = {"equal": bool(equal.all()), "distinct": distinct, "base_rows": base_rows}
    result["gathered_once_equal"] = bool((once == mixed).all())
    result["traces"] = traces
    if differs:
        print(f"rows that differ: {differs}")
    if not args.no_timing:
        rates = throughput(model, params, adapters, bank, prompts, names, size)
        one = rates["one adapter, factored (jlora.linen)"]
        print(f"\n{'case':40s} {'tokens/s':>9s} {'x one adapter':>14s}")
        for name, rate in rates.items():
            print(f"{name:40s} {rate:9.0f} {rate / one:14.2f}")
        result["rates"] = rates
    return result


if __name__ == "__main__":
    main()
