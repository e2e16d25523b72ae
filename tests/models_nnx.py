"""Small Flax NNX models that nobody wrote for LoRA, one per layer kind jlora.nnx adapts.

Each ``ZOO`` entry builds a model, a batch, a regression target for a small task, and the targets
that adapt it. Sizes are tiny so every test runs in well under a second on a CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

D, HEADS, HEAD_DIM, VOCAB, SEQ = 16, 2, 8, 13, 6


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(10, 32, rngs=rngs),
                nnx.Linear(32, 32, rngs=rngs),
                nnx.Linear(32, 3, rngs=rngs),
            ]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


class Attention(nnx.Module):
    """Multi-head self-attention with LinearGeneral projections ``(d, heads, head_dim)``."""

    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.key = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.value = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.out = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM).astype(np.float32)
        causal = jnp.tril(jnp.ones((x.shape[-2], x.shape[-2]), bool))
        logits = jnp.where(causal, logits, jnp.asarray(-1e9, logits.dtype))
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), v))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = Attention(rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class Decoder(nnx.Module):
    """GPT-style decoder: a list of blocks (paths ``blocks/0/...``), a tied embedding as head.

    The zoo runs its stacked twin below; this one is adapted abstractly (paths, errors)."""

    def __init__(self, rngs: nnx.Rngs, layers: int = 1):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.ln(x))


class ScannedDecoder(nnx.Module):
    """The same decoder with its blocks stacked by ``nnx.vmap`` and run by ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs, layers: int = 2):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Block(rngs)

        self.blocks = blocks(rngs)
        self.ln = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return self.embed.attend(self.ln(forward(self.embed(ids), self.blocks)))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), padding=1, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, padding="REFLECT", rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.conv1(x)))
        return self.head(jax.nn.relu(self.conv2(x)).mean(axis=(1, 2)))


class TiedLM(nnx.Module):
    """Bag-of-words language model: embedding, one hidden layer, the embedding as output head."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.hidden = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, ids):
        h = jax.nn.tanh(self.hidden(self.embed(ids).mean(axis=-2)))
        return self.embed.attend(h)


class EinsumNet(nnx.Module):
    """Projections written as ``nnx.Einsum``, one of them per head (a shared kernel letter)."""

    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Einsum("btd,dhk->bthk", (D, HEADS, HEAD_DIM), (HEADS, HEAD_DIM), rngs=rngs)
        self.per_head = nnx.Einsum("bthk,hkj->bthj", (HEADS, HEAD_DIM, HEAD_DIM), rngs=rngs)
        self.out = nnx.Einsum("...hj,hjd->...d", (HEADS, HEAD_DIM, 4), (4,), rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.per_head(jax.nn.gelu(self.proj(x)))))


def materialise(build: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
    """``build(rngs)`` with NumPy-drawn weights: traced abstractly, so no XLA program is compiled
    per weight shape (Flax's eager initialisers compile one each, seconds per model on a CPU)."""
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in jax.tree_util.tree_leaves_with_path(
        nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable)
    ):
        name, shape = jax.tree_util.keystr(path[-1:]), var.shape
        if name in ("['scale']", "['var']"):
            value = np.ones(shape)
        elif name in ("['bias']", "['mean']"):
            value = 0.1 * rng.normal(size=shape)
        else:
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        var.set_value(jnp.asarray(value, var.dtype))
    return model


@dataclasses.dataclass(frozen=True)
class Case:
    """A model of the zoo: how to build it, a batch, a target, and what to adapt."""

    name: str
    build: Callable[[nnx.Rngs], nnx.Module]
    batch: Callable[[np.random.Generator], np.ndarray]
    targets: tuple[str, ...]
    n_adapted: int


def _ids(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, VOCAB, size=(4, SEQ)).astype(np.int32)


ZOO = (
    Case("mlp", MLP, lambda r: r.normal(size=(8, 10)).astype(np.float32), (r".*kernel",), 3),
    Case(
        "decoder",
        ScannedDecoder,
        _ids,
        (r"blocks/(attn/)?(query|value|out|up|down)/kernel", r"embed/embedding"),
        6,
    ),
    Case("cnn", CNN, lambda r: r.normal(size=(4, 8, 8, 1)).astype(np.float32), (r".*kernel",), 3),
    Case("tied", TiedLM, _ids, (r"embed/embedding", r"hidden/kernel"), 2),
    Case(
        "einsum", EinsumNet, lambda r: r.normal(size=(2, 5, D)).astype(np.float32), (".*kernel",), 3
    ),
)
