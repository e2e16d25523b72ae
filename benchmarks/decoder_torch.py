"""The benchmark decoder of ``decoder.py`` as a PyTorch module, for the Hugging Face PEFT peer.

Same blocks, names and maths as the Linen ``Decoder``: pre-norm causal attention with
``query``/``key``/``value``/``out`` and a tanh-GELU MLP (``up``/``down``; Linen's ``nn.gelu``
default), LayerNorm epsilon 1e-6, tied embedding head. :func:`load_linen_params` copies a Linen
decoder's weights (Linen kernels are ``(in, out)``, torch weights ``(out, in)``), so both compute
the same loss. Needs ``torch`` (and ``peft`` for the adapters); only imported in the subprocess
that runs the torch peer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

PROJECTIONS = ("query", "key", "value", "out", "up", "down")


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(d_model, eps=1e-6)
        self.ln_mlp = nn.LayerNorm(d_model, eps=1e-6)
        for name in ("query", "key", "value", "out"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        head_dim = d // self.heads
        h = self.ln_attn(x)

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, head_dim)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        logits = logits.masked_fill(~causal, -1e9)
        attn = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, dim=-1), v)
        x = x + self.out(attn.reshape(b, t, d))
        h = self.ln_mlp(x)
        return x + self.down(nn.functional.gelu(self.up(h), approximate="tanh"))


class Decoder(nn.Module):
    def __init__(self, vocab: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList([Block(d_model, heads) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, tokens: torch.Tensor, h0_offset: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        if h0_offset is not None:
            x = x + h0_offset
        t = tokens.shape[1]
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
        for block in self.layers:
            x = block(x, causal)
        return self.ln_final(x) @ self.embed.weight.T


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))


def load_linen_params(model: Decoder, flat: dict[str, np.ndarray]) -> None:
    """Copies Linen weights, given as ``{'layers_0/query/kernel': array, ...}``, into ``model``."""

    def put(param: torch.Tensor, value: np.ndarray) -> None:
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    put(model.embed.weight, flat["embed/embedding"])
    put(model.ln_final.weight, flat["ln_final/scale"])
    put(model.ln_final.bias, flat["ln_final/bias"])
    for i, block in enumerate(model.layers):
        for name in PROJECTIONS:
            put(getattr(block, name).weight, flat[f"layers_{i}/{name}/kernel"].T)
            put(getattr(block, name).bias, flat[f"layers_{i}/{name}/bias"])
        for name in ("ln_attn", "ln_mlp"):
            put(getattr(block, name).weight, flat[f"layers_{i}/{name}/scale"])
            put(getattr(block, name).bias, flat[f"layers_{i}/{name}/bias"])
