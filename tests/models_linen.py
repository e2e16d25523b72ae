"""A zoo of small flax.linen models nobody wrote for LoRA, each with a tiny task, for jlora.linen.

Sizes are small and pairwise distinct (batch and sequence lengths differ from every weight
dimension), so a test that looks for an array of a weight's shape in a train step's jaxpr cannot
meet an activation of the same shape by accident.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


class MLP(nn.Module):
    """Dense layers with the model's own dropout (``train=True``)."""

    hidden: int = 24
    out: int = 5
    rate: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(self.hidden, name="up")(x))
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.hidden, name="mid")(x))
        return nn.Dense(self.out, name="head")(x)


class Attention(nn.Module):
    """Causal self-attention with DenseGeneral projections ``d -> (heads, head_dim) -> d``."""

    heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x):
        def proj(name):
            return nn.DenseGeneral((self.heads, self.head_dim), name=name)(x)

        q, k, v = proj("query"), proj("key"), proj("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        t = x.shape[-2]
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = nn.softmax(jnp.where(causal, logits, -1e9))
        o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class Block(nn.Module):
    """Pre-norm transformer block, shaped for ``nn.scan`` (carry, per-step input)."""

    heads: int
    head_dim: int
    d_ff: int

    @nn.compact
    def __call__(self, x, _):
        x = x + Attention(self.heads, self.head_dim, name="attn")(nn.LayerNorm(name="ln1")(x))
        h = nn.gelu(nn.Dense(self.d_ff, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(x.shape[-1], name="down")(h), None


class Decoder(nn.Module):
    """GPT-style decoder: embedding, ``nn.scan`` over ``nn.remat`` blocks, tied output head."""

    vocab: int = 13
    d_model: int = 16
    heads: int = 2
    head_dim: int = 6
    d_ff: int = 40
    layers: int = 3

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        stack = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.layers,
        )
        x, _ = stack(self.heads, self.head_dim, self.d_ff, name="layers")(embed(ids), None)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


class CNN(nn.Module):
    """Two convolutions with batch norm (``batch_stats`` mutable in train mode) and a Dense head."""

    classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3), padding="SAME", name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x))
        x = nn.Conv(7, (3, 3), strides=2, padding="CIRCULAR", kernel_dilation=1, name="conv2")(x)
        return nn.Dense(self.classes, name="head")(nn.relu(x).reshape(x.shape[0], -1))


class TiedEmbedding(nn.Module):
    """A bag-of-words language model: lookup, a Dense, and the table again as output head."""

    vocab: int = 17
    features: int = 12

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.features, name="embed")
        h = jnp.tanh(nn.Dense(self.features, name="mix")(embed(ids)))
        return embed.attend(h)


class Expert(nn.Module):
    """An nn.Einsum projection ``d -> (heads, k)`` then a Dense."""

    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((10, 3, 4), "bd,dhk->bhk", name="proj")(x)
        return nn.Dense(6, name="mix")(jnp.tanh(h).reshape(h.shape[0], -1))


class Ensemble(nn.Module):
    """``nn.vmap`` over three experts with their own weights, averaged."""

    @nn.compact
    def __call__(self, x):
        experts = nn.vmap(
            Expert,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=None,
            out_axes=0,
            axis_size=3,
        )
        return experts(name="experts")(x).mean(0)


def _mse(out, y):
    return jnp.mean((out - y) ** 2)


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass(frozen=True)
class Case:
    """A zoo model with its data, adapter config, task loss and the layouts jlora should infer."""

    name: str
    model: nn.Module
    x: Any
    y: Any
    config: jlora.LoraConfig
    loss: Callable[[Any, Any], jax.Array]
    layouts: dict[str, str]
    train_kwargs: dict = dataclasses.field(default_factory=dict)
    mutable: tuple[str, ...] = ()

    def variables(self):
        """All the model's collections at init."""
        return self.model.init(jax.random.key(0), self.x)

    def kernel_shapes(self, params) -> set[tuple[int, ...]]:
        """Shapes of every targeted weight: whole, per stacked layer, and as a fan_in x fan_out matrix."""
        shapes = set()
        for path, leaf in jlora._paths.leaves_with_paths(params):
            if self.config.selects(path):
                spec = self.layouts[path]
                stack, fan_in = spec.count("s"), spec.count("i") + spec.count("v")
                shape = tuple(leaf.shape)
                shapes.add(shape)
                shapes.add(shape[stack:])
                matrix = (
                    math.prod(shape[stack : stack + fan_in]),
                    math.prod(shape[stack + fan_in :]),
                )
                shapes.add(matrix)
                shapes.add(shape[:stack] + matrix)
        return shapes


def _rng(seed):
    return np.random.default_rng(seed)


def _teacher(x, out, seed):
    w = _rng(seed).normal(size=(x.shape[-1], out)) / np.sqrt(x.shape[-1])
    return np.tanh(x @ w).astype(np.float32)


def cases() -> list[Case]:
    """One Case per zoo model."""
    x_mlp = _rng(1).normal(size=(32, 12)).astype(np.float32)
    ids = np.tile(np.arange(7), (4, 1)) + _rng(2).integers(0, 13, size=(4, 1))
    ids = (ids % 13).astype(np.int32)
    x_cnn = _rng(3).normal(size=(10, 8, 8, 1)).astype(np.float32)
    bow = _rng(4).integers(0, 17, size=(9, 5)).astype(np.int32)
    x_ens = _rng(5).normal(size=(14, 10)).astype(np.float32)
    return [
        Case(
            "mlp",
            MLP(),
            x_mlp,
            _teacher(x_mlp, 5, 11),
            jlora.LoraConfig(targets=r"(up|mid|head)/kernel", rank=3, alpha=6.0, dropout=0.1),
            _mse,
            {"up/kernel": "io", "mid/kernel": "io", "head/kernel": "io"},
            train_kwargs={"train": True},
        ),
        Case(
            "decoder",
            Decoder(),
            ids[:, :-1],
            ids[:, 1:],
            jlora.LoraConfig(
                targets=(r"layers/attn/(query|value|out)/kernel", r"layers/up/kernel", "embed/.*"),
                rank=2,
                alpha=4.0,
                dropout=0.1,
            ),
            _xent,
            {
                "layers/attn/query/kernel": "sioo",
                "layers/attn/value/kernel": "sioo",
                "layers/attn/out/kernel": "siio",
                "layers/up/kernel": "sio",
                "embed/embedding": "vo",
            },
        ),
        Case(
            "cnn",
            CNN(),
            x_cnn,
            (np.arange(10) % 4).astype(np.int32),
            jlora.LoraConfig(targets=r"(conv1|conv2|head)/kernel", rank=2, alpha=2.0),
            _xent,
            {"conv1/kernel": "iiio", "conv2/kernel": "iiio", "head/kernel": "io"},
            train_kwargs={"train": True},
            mutable=("batch_stats",),
        ),
        Case(
            "tied_embedding",
            TiedEmbedding(),
            bow,
            (bow[:, 0] * 3 % 17).astype(np.int32),
            jlora.LoraConfig(targets=r"(embed/embedding|mix/kernel)", rank=3, alpha=3.0),
            lambda logits, y: _xent(logits.mean(1), y),
            {"embed/embedding": "vo", "mix/kernel": "io"},
        ),
        Case(
            "einsum_vmap",
            Ensemble(),
            x_ens,
            _teacher(x_ens, 6, 12),
            jlora.LoraConfig(targets=r"experts/(proj|mix)/kernel", rank=2, alpha=4.0, dropout=0.1),
            _mse,
            {"experts/proj/kernel": "sioo", "experts/mix/kernel": "sio"},
        ),
    ]


def random_variables(model: nn.Module, x: Any, seed: int = 0) -> dict:
    """The model's variables filled with NumPy random values (no jax.random compile, fast).

    Kernels and tables ~ N(0, 0.3^2); biases and means small; scales near 1, variances 1.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = _rng(seed)

    def fill(path, s):
        name = jlora._paths.path_to_str(path).rsplit("/", 1)[-1]
        if name == "var":
            return np.ones(s.shape, s.dtype)
        if name == "scale":
            return (1 + 0.1 * rng.normal(size=s.shape)).astype(s.dtype)
        if name in ("bias", "mean"):
            return (0.1 * rng.normal(size=s.shape)).astype(s.dtype)
        return (0.3 * rng.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
