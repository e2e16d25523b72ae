"""A tiny Linen decoder and synthetic sequence-to-sequence tasks, for the LoRA experiments.

A sequence is ``[task] x_1 .. x_n [sep] y_1 .. y_n``: ``x`` is ``n`` random symbols from an
alphabet of ``symbols`` and ``y`` a function of ``x`` chosen by the task (copy or reverse). The
model is trained by next-token prediction on the ``y`` half only (the ``x`` half is
noise), and scored by token accuracy and exact match on ``y`` under teacher forcing. Exact match
under teacher forcing equals exact match of greedy decoding: if every next token is right given the
right prefix, greedy decoding reproduces the whole answer.

The decoder is GPT-style (pre-norm, causal attention with ``query``/``key``/``value``/``out``
``nn.Dense`` projections, a GELU MLP, learned positions, an untied head), so LoRA targets are plain
regexes over ``layers_{i}/{query,key,value,out}/kernel``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

TASKS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "copy": lambda x: x,
    "reverse": lambda x: x[:, ::-1],
}
"""The answer ``y`` as a function of ``x: (batch, n)``."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """Sizes of the tasks and of the model."""

    symbols: int = 16
    length: int = 8
    d_model: int = 128
    heads: int = 4
    layers: int = 2

    @property
    def vocab(self) -> int:
        """Symbols, then one token per task, then the separator."""
        return self.symbols + len(TASKS) + 1

    @property
    def seq(self) -> int:
        return 2 * self.length + 2

    def task_token(self, task: str) -> int:
        return self.symbols + list(TASKS).index(task)

    @property
    def sep(self) -> int:
        return self.vocab - 1


def make_batch(key: jax.Array, spec: Spec, task: str, batch: int) -> jax.Array:
    """``(batch, 2 n + 2)`` token ids ``[task] x [sep] y`` with ``x`` uniform over the symbols."""
    x = jax.random.randint(key, (batch, spec.length), 0, spec.symbols)
    y = TASKS[task](x)
    column = lambda t: jnp.full((batch, 1), t, x.dtype)  # noqa: E731
    return jnp.concatenate([column(spec.task_token(task)), x, column(spec.sep), y], axis=1)


class Block(nn.Module):
    spec: Spec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        head_dim = s.d_model // s.heads
        h = nn.LayerNorm(name="ln_attn")(x)
        q, k, v = (
            nn.Dense(s.d_model, name=name)(h).reshape(*x.shape[:-1], s.heads, head_dim)
            for name in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        logits = jnp.where(causal, logits, np.float32(-1e9))
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + nn.Dense(s.d_model, name="out")(attn.reshape(x.shape))
        h = nn.LayerNorm(name="ln_mlp")(x)
        return x + nn.Dense(s.d_model, name="down")(nn.gelu(nn.Dense(4 * s.d_model, name="up")(h)))


class Decoder(nn.Module):
    """Token ids ``(batch, seq)`` to next-token logits ``(batch, seq, vocab)``."""

    spec: Spec

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        s = self.spec
        x = nn.Embed(s.vocab, s.d_model, name="embed")(tokens)
        x = x + self.param("positions", nn.initializers.normal(0.02), (1, s.seq, s.d_model))
        for i in range(s.layers):
            x = Block(s, name=f"layers_{i}")(x)
        return nn.Dense(s.vocab, name="head")(nn.LayerNorm(name="ln_final")(x))


def answer_logits(logits: jax.Array, spec: Spec) -> jax.Array:
    """The logits that predict ``y_1 .. y_n``: those at ``[sep], y_1 .. y_{n-1}``."""
    return logits[:, spec.length + 1 : spec.seq - 1]


def answer_loss(logits: jax.Array, tokens: jax.Array, spec: Spec) -> jax.Array:
    """Mean next-token cross-entropy over the answer ``y`` (the random ``x`` is not scored)."""
    return optax.softmax_cross_entropy_with_integer_labels(
        answer_logits(logits, spec), tokens[:, spec.length + 2 :]
    ).mean()


def answer_scores(logits: jax.Array, tokens: jax.Array, spec: Spec) -> tuple[float, float]:
    """``(token accuracy, exact match)`` of the answer under teacher forcing."""
    right = jnp.argmax(answer_logits(logits, spec), -1) == tokens[:, spec.length + 2 :]
    return float(jnp.mean(right)), float(jnp.mean(jnp.all(right, axis=-1)))


def fit(
    loss: Callable[[object, object, jax.Array], jax.Array],
    trainable: object,
    frozen: object,
    make: Callable[[jax.Array], jax.Array],
    *,
    steps: int,
    lr: float,
    key: jax.Array,
    chunk: int = 100,
    on_chunk: Callable[[int, object], None] | None = None,
) -> object:
    """Trains ``trainable``, the first argument of ``loss(trainable, frozen, tokens)``, with Adam.

    The learning rate warms up over the first 10% of ``steps``, then decays to 0 (cosine);
    gradients are clipped to global norm 1. Every step draws a fresh batch ``make(key)``; steps run
    ``chunk`` at a time inside one ``lax.scan``. ``frozen`` is an argument of its own, never
    differentiated. ``on_chunk(step, trainable)`` runs after each chunk (for curves).
    """
    if steps <= 0 or steps % chunk:
        raise ValueError(f"fit: steps={steps} must be a positive multiple of chunk={chunk}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = tx.init(trainable)

    @jax.jit
    def run(trainable, opt_state, frozen, key):
        def step(carry, k):
            trainable, opt_state = carry
            grads = jax.grad(loss)(trainable, frozen, make(k))
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), None

        (trainable, opt_state), _ = jax.lax.scan(
            step, (trainable, opt_state), jax.random.split(key, chunk)
        )
        return trainable, opt_state

    for done in range(chunk, steps + 1, chunk):
        key, sub = jax.random.split(key)
        trainable, opt_state = run(trainable, opt_state, frozen, sub)
        if on_chunk is not None:
            on_chunk(done, trainable)
    return trainable


def fit_many(
    loss: Callable[[object, object, jax.Array], jax.Array],
    trainables: object,
    frozen: object,
    make: Callable[[jax.Array], jax.Array],
    *,
    steps: int,
    lrs: jax.Array,
    keys: jax.Array,
    chunk: int = 100,
    on_chunk: Callable[[int, object], None] | None = None,
) -> object:
    """:func:`fit` for ``M`` members side by side under ``jax.vmap`` (one compile for all).

    ``trainables`` is stacked on a leading axis of size ``M``; member ``m`` trains with its own
    peak learning rate ``lrs[m]`` and batch key ``keys[m]``, drawing the same batches and taking
    the same steps as ``fit(..., lr=lrs[m], key=keys[m])`` (up to float rounding: Adam's update is
    scaled by the member's learning rate after the shared unit schedule). ``frozen`` is shared.
    """
    if steps <= 0 or steps % chunk:
        raise ValueError(f"fit_many: steps={steps} must be a positive multiple of chunk={chunk}")
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 10), steps)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale_by_schedule(unit)
    )
    opt_state = jax.vmap(tx.init)(trainables)
    lrs = jnp.asarray(lrs, jnp.float32)

    @jax.jit
    def run(trainables, opt_state, frozen, keys, lrs):
        def member(trainable, opt_state, key, lr):
            def step(carry, k):
                trainable, opt_state = carry
                grads = jax.grad(loss)(trainable, frozen, make(k))
                updates, opt_state = tx.update(grads, opt_state, trainable)
                updates = jax.tree.map(lambda u: -lr * u, updates)
                return (optax.apply_updates(trainable, updates), opt_state), None

            carry = (trainable, opt_state)
            return jax.lax.scan(step, carry, jax.random.split(key, chunk))[0]

        return jax.vmap(member)(trainables, opt_state, keys, lrs)

    for done in range(chunk, steps + 1, chunk):
        pairs = jax.vmap(jax.random.split)(keys)
        keys, subs = pairs[:, 0], pairs[:, 1]
        trainables, opt_state = run(trainables, opt_state, frozen, subs, lrs)
        if on_chunk is not None:
            on_chunk(done, trainables)
    return trainables
