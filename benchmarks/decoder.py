"""A GPT-style decoder in flax.linen, sized from the command line, for the benchmarks.

Pre-norm blocks: causal multi-head attention with ``query``/``key``/``value``/``out`` Dense
projections and a GELU MLP (``up``/``down``), tied input/output embedding. ``h0_offset`` adds to
the embedded tokens, so the *floor* step can differentiate with respect to activations only.

``remat`` wraps every block in ``nn.remat`` with one of :data:`REMAT_POLICIES`: the backward pass
then recomputes what the policy does not save, block by block, instead of keeping it from the
forward pass (the adapters' inputs among it). ``scan=True`` runs the blocks as one ``nn.scan``
(parameters stacked under ``layers``), so a rematted block is recomputed inside the backward loop.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

import jlora

REMAT_POLICIES = {
    "jlora": jlora.remat_policy(),
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Size:
    vocab: int = 512
    d_model: int = 512
    heads: int = 8
    layers: int = 4
    seq: int = 128
    batch: int = 8

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model


class Block(nn.Module):
    size: Size
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.size
        head_dim = s.d_model // s.heads
        dense = lambda features, name: nn.Dense(features, name=name, dtype=self.dtype)  # noqa: E731
        h = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
        q, k, v = (dense(s.d_model, n)(h) for n in ("query", "key", "value"))
        split = lambda t: t.reshape(*t.shape[:-1], s.heads, head_dim)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(head_dim, q.dtype))
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        logits = jnp.where(causal, logits, jnp.asarray(-1e9, logits.dtype))
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + dense(s.d_model, "out")(attn.reshape(x.shape))
        h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
        return x + dense(s.d_model, "down")(nn.gelu(dense(s.d_ff, "up")(h)))


class _ScanStep(nn.Module):
    size: Size
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        return Block(self.size, self.dtype, name="block")(x), None


class Decoder(nn.Module):
    size: Size
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None
    scan: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, h0_offset: jax.Array | None = None) -> jax.Array:
        embed = nn.Embed(self.size.vocab, self.size.d_model, name="embed")
        x = embed(tokens).astype(self.dtype)
        if h0_offset is not None:
            x = x + h0_offset.astype(self.dtype)
        if self.scan:
            step = _ScanStep
            if self.remat is not None:
                step = nn.remat(_ScanStep, policy=REMAT_POLICIES[self.remat])
            stack = nn.scan(
                step, variable_axes={"params": 0}, split_rngs={"params": True},
                length=self.size.layers,
            )
            x = stack(self.size, self.dtype, name="layers")(x, None)[0]
        else:
            policy = REMAT_POLICIES.get(self.remat)
            block = Block if self.remat is None else nn.remat(Block, policy=policy)
            for i in range(self.size.layers):
                x = block(self.size, self.dtype, name=f"layers_{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
        return embed.attend(x).astype(jnp.float32)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
