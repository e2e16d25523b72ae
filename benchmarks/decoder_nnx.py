"""The benchmark decoder of ``decoder.py`` in flax.nnx, with Flax's own ``nnx.LoRALinear`` layers.

Same blocks, names and maths as the Linen ``Decoder`` (pre-norm causal attention, GELU MLP, tied
embedding head); :func:`load_linen_params` copies a Linen decoder's weights in, so both compute the
same loss. Targeted projections are ``nnx.LoRALinear`` (Flax's LoRA: ``y = x W + x a b``, factors
in ``nnx.LoRAParam`` variables, no alpha/r scale), the rest plain ``nnx.Linear``.

:class:`ScannedDecoder` is the same decoder with plain layers (for ``jlora.nnx.lora``) and its
blocks stacked by ``nnx.vmap`` and run by one ``nnx.scan``, each optionally under ``nnx.remat``
with a checkpoint policy (the NNX form of the Linen ``Decoder(scan=True, remat=...)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from decoder import Size
from flax import nnx

PROJECTIONS = ("query", "key", "value", "out", "up", "down")


class Block(nnx.Module):
    def __init__(self, size: Size, dtype, lora: tuple[str, ...], rank: int, rngs: nnx.Rngs):
        self.size = size
        d, f = size.d_model, size.d_ff
        shapes = {
            "query": (d, d),
            "key": (d, d),
            "value": (d, d),
            "out": (d, d),
            "up": (d, f),
            "down": (f, d),
        }
        for name, (fan_in, fan_out) in shapes.items():
            if name in lora:
                layer = nnx.LoRALinear(fan_in, fan_out, lora_rank=rank, dtype=dtype, rngs=rngs)
            else:
                layer = nnx.Linear(fan_in, fan_out, dtype=dtype, rngs=rngs)
            setattr(self, name, layer)
        self.ln_attn = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.ln_mlp = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.size
        head_dim = s.d_model // s.heads
        h = self.ln_attn(x)
        split = lambda t: t.reshape(*t.shape[:-1], s.heads, head_dim)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(head_dim, q.dtype))
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        logits = jnp.where(causal, logits, jnp.asarray(-1e9, logits.dtype))
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + self.out(attn.reshape(x.shape))
        h = self.ln_mlp(x)
        return x + self.down(nnx.gelu(self.up(h)))


class Decoder(nnx.Module):
    def __init__(
        self, size: Size, dtype, *, lora: tuple[str, ...] = (), rank: int = 8, rngs: nnx.Rngs
    ):
        self.size = size
        self.dtype = dtype
        self.embed = nnx.Embed(size.vocab, size.d_model, rngs=rngs)
        self.layers = nnx.List([Block(size, dtype, lora, rank, rngs) for _ in range(size.layers)])
        self.ln_final = nnx.LayerNorm(size.d_model, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens).astype(self.dtype)
        for block in self.layers:
            x = block(x)
        x = self.ln_final(x)
        return self.embed.attend(x).astype(jnp.float32)


def load_linen_params(model: Decoder, params: dict) -> None:
    """Copies the weights of a Linen ``decoder.Decoder`` (same size) into ``model``, in place."""
    model.embed.embedding[...] = params["embed"]["embedding"]
    model.ln_final.scale[...] = params["ln_final"]["scale"]
    model.ln_final.bias[...] = params["ln_final"]["bias"]
    for i, block in enumerate(model.layers):
        p = params[f"layers_{i}"]
        for name in PROJECTIONS:
            getattr(block, name).kernel[...] = p[name]["kernel"]
            getattr(block, name).bias[...] = p[name]["bias"]
        for name in ("ln_attn", "ln_mlp"):
            getattr(block, name).scale[...] = p[name]["scale"]
            getattr(block, name).bias[...] = p[name]["bias"]


class ScannedDecoder(nnx.Module):
    def __init__(self, size: Size, dtype, *, policy=None, rngs: nnx.Rngs):
        self.size = size
        self.dtype = dtype
        self.policy = policy
        self.embed = nnx.Embed(size.vocab, size.d_model, rngs=rngs)
        make = nnx.vmap(lambda r: Block(size, dtype, (), 0, r), in_axes=0, out_axes=0)
        self.layers = nnx.split_rngs(splits=size.layers)(make)(rngs)
        self.ln_final = nnx.LayerNorm(size.d_model, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens).astype(self.dtype)
        body = lambda x, block: block(x)  # noqa: E731
        if self.policy is not None:
            body = nnx.remat(body, policy=self.policy)
        x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
        x = self.ln_final(x)
        return self.embed.attend(x).astype(jnp.float32)


def load_linen_params_stacked(model: ScannedDecoder, params: dict) -> None:
    """Copies a Linen loop ``decoder.Decoder``'s weights into ``model``, its blocks stacked."""
    model.embed.embedding[...] = params["embed"]["embedding"]
    model.ln_final.scale[...] = params["ln_final"]["scale"]
    model.ln_final.bias[...] = params["ln_final"]["bias"]
    blocks = [params[f"layers_{i}"] for i in range(model.size.layers)]
    for name in (*PROJECTIONS, "ln_attn", "ln_mlp"):
        layer = getattr(model.layers, name)
        for leaf in ("kernel", "bias") if name in PROJECTIONS else ("scale", "bias"):
            getattr(layer, leaf)[...] = jnp.stack([p[name][leaf] for p in blocks])
