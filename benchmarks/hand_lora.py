"""A hand-written pure-JAX twin of ``decoder.Decoder`` with plain (autodiff) factored LoRA terms.

The compile-time reference for what any LoRA step costs: the same weights, blocks and loss as the
Linen decoder, every projection ``x W + b + (x (scale a)) b_lora`` written out with ``jnp`` and
differentiated by plain autodiff (no custom VJP, no barrier, no interceptor). With ``adapters=None``
it is the frozen model, whose gradient for ``h0_offset`` is the pure-JAX floor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from decoder import Size

PROJECTIONS = ("query", "key", "value", "out", "up", "down")


def _norm(x: jax.Array, p: dict) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def adapters(size: Size, rank: int) -> dict:
    """Zero-initialised ``{layer: {projection: {'a', 'b'}}}`` (compile time needs shapes only)."""
    fan = {"up": (size.d_model, size.d_ff), "down": (size.d_ff, size.d_model)}
    out = {}
    for i in range(size.layers):
        out[f"layers_{i}"] = {}
        for n in PROJECTIONS:
            fan_in, fan_out = fan.get(n, (size.d_model, size.d_model))
            out[f"layers_{i}"][n] = {
                "a": jnp.zeros((fan_in, rank)), "b": jnp.zeros((rank, fan_out))
            }
    return out


def apply(
    size: Size, params: dict, lora: dict | None, tokens: jax.Array, scale: float,
    h0_offset: jax.Array | None = None,
) -> Any:
    """The decoder's logits from Linen ``params`` plus the factored terms of ``lora``."""
    head_dim = size.d_model // size.heads

    def dense(p: dict, f: dict | None, x: jax.Array) -> jax.Array:
        y = x @ p["kernel"] + p["bias"]
        return y if f is None else y + (x @ (f["a"] * scale)) @ f["b"]

    x = params["embed"]["embedding"][tokens]
    if h0_offset is not None:
        x = x + h0_offset
    for i in range(size.layers):
        p = params[f"layers_{i}"]
        f = lora[f"layers_{i}"] if lora is not None else dict.fromkeys(PROJECTIONS)
        h = _norm(x, p["ln_attn"])
        q, k, v = (
            dense(p[n], f[n], h).reshape(*h.shape[:-1], size.heads, head_dim)
            for n in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(head_dim, q.dtype))
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        logits = jnp.where(causal, logits, jnp.asarray(-1e9, logits.dtype))
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + dense(p["out"], f["out"], attn.reshape(x.shape))
        h = _norm(x, p["ln_mlp"])
        x = x + dense(p["down"], f["down"], jax.nn.gelu(dense(p["up"], f["up"], h)))
    x = _norm(x, params["ln_final"])
    return x @ params["embed"]["embedding"].T
