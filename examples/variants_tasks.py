"""examples/variants.py's training loop and its two tasks (copy -> reverse, digits 0-4 -> 5-9)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from decoder_tasks import Decoder, Spec, answer_loss, answer_scores, make_batch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# ----------------------------------------------------------------------------------------------
# Training loop: Adam (or any optax transform) with warm-up + cosine decay, clipping, scan chunks.


def schedule_for(lr: float, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)


def adam_tx(lr: float | optax.Schedule) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


_COMPILED: dict[Any, Callable] = {}
"""Jitted chunks by ``cache``: one compilation serves all seeds and learning rates of a method."""


def train(
    loss: Callable,
    trainable: Any,
    frozen: Any,
    make: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    *,
    steps: int,
    key: jax.Array,
    lr: float = 1.0,
    chunk: int = 100,
    post: Callable | None = None,
    post_state: Any = None,
    between: Callable | None = None,
    cache: Any = None,
) -> tuple[Any, Any]:
    """``steps`` steps of ``tx`` (its schedule peaking at 1) times ``lr``, on fresh batches.

    ``lr`` multiplies the updates (a traced argument, so runs that share ``cache`` share one
    compilation; for Adam that equals a schedule peaking at ``lr``). Batches are ``make(k)``,
    ``chunk`` steps per ``lax.scan``. ``post(t, trainable, grads, post_state) -> (trainable,
    post_state)`` runs inside the step after the update (AdaLoRA's importance and masking).
    ``between(done, trainable, frozen, opt_state) -> (trainable, frozen, opt_state)`` runs between
    chunks, outside jit (ReLoRA's restarts).
    """
    opt_state = tx.init(trainable)

    def run(trainable, opt_state, post_state, frozen, t0, key, lr):
        def step(carry, inputs):
            trainable, opt_state, post_state = carry
            t, k = inputs
            grads = jax.grad(loss)(trainable, frozen, make(k))
            updates, opt_state = tx.update(grads, opt_state, trainable)
            updates = jax.tree.map(lambda u: lr * u, updates)
            trainable = optax.apply_updates(trainable, updates)
            if post is not None:
                trainable, post_state = post(t, trainable, grads, post_state)
            return (trainable, opt_state, post_state), None

        ts = t0 + jnp.arange(chunk)
        carry, _ = jax.lax.scan(
            step, (trainable, opt_state, post_state), (ts, jax.random.split(key, chunk))
        )
        return carry

    if cache is None:
        compiled = jax.jit(run)
    else:
        compiled = _COMPILED.setdefault((cache, steps, chunk), jax.jit(run))
    lr = jnp.float32(lr)
    for done in range(chunk, steps + 1, chunk):
        key, sub = jax.random.split(key)
        trainable, opt_state, post_state = compiled(
            trainable, opt_state, post_state, frozen, done - chunk, sub, lr
        )
        if between is not None and done < steps:
            trainable, frozen, opt_state = between(done, trainable, frozen, opt_state)
    return trainable, frozen


def size(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Tasks: a frozen base, what to adapt, a batch maker, validation and test scores.


@dataclasses.dataclass
class Task:
    name: str
    model: nn.Module
    params: Any
    targets: str
    rank: int  # plain LoRA's rank; every other method is matched to its trainable count
    sample: Any
    make: Callable[[jax.Array], Any]
    loss: Callable[[jax.Array, Any], jax.Array]  # (logits, batch) -> scalar
    val: Any
    test: Any
    scores: Callable[[jax.Array, Any], dict]
    steps: int
    lrs: tuple[float, ...]
    weights: tuple[str, ...] = ()  # the adapted kernels' paths
    quick_lr: float = 1e-2  # --quick skips the sweep


def decoder_task(steps: int, pretrain: int, d_model: int = 128) -> Task:
    spec = Spec(d_model=d_model)
    model = Decoder(spec)
    test = make_batch(jax.random.key(12345), spec, "reverse", 1024)
    val = make_batch(jax.random.key(777), spec, "reverse", 512)
    params = model.init(jax.random.key(0), test[:1])["params"]
    loss = lambda logits, tokens: answer_loss(logits, tokens, spec)  # noqa: E731
    params, _ = train(
        lambda p, _, tokens: loss(model.apply({"params": p}, tokens), tokens),
        params,
        None,
        lambda k: make_batch(k, spec, "copy", 32),
        adam_tx(schedule_for(3e-3, pretrain)),
        steps=pretrain,
        key=jax.random.key(1),
    )

    def scores(logits, tokens):
        accuracy, exact = answer_scores(logits, tokens, spec)
        return {"score": accuracy, "exact": exact, "loss": float(loss(logits, tokens))}

    return Task(
        "decoder", model, params, r"layers_\d+/(query|value)/kernel", 4, test[:1],
        lambda k: make_batch(k, spec, "reverse", 32), loss, val, test, scores, steps,
        (2e-3, 5e-3, 1.25e-2, 3.125e-2),
        tuple(f"layers_{i}/{n}/kernel" for i in range(spec.layers) for n in ("query", "value")),
        1.25e-2,
    )  # fmt: skip


class MLP(nn.Module):
    hidden: int = 128
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden, name="hidden_0")(x))
        x = nn.relu(nn.Dense(self.hidden, name="hidden_1")(x))
        return nn.Dense(self.classes, name="head")(x)


def digits_split(seed: int = 0):
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_tr, y_tr, test_size=0.2, random_state=seed, stratify=y_tr
    )
    return (x_tr, y_tr), (x_va, y_va), (x_te, y_te)


def sampler(x: np.ndarray, y: np.ndarray, batch: int = 32) -> Callable:
    x, y = jnp.asarray(x), jnp.asarray(y)
    return lambda k: (lambda i: (x[i], y[i]))(jax.random.randint(k, (batch,), 0, len(x)))


def xent(logits: jax.Array, batch: Any) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


def class_scores(logits: jax.Array, batch: Any) -> dict:
    right = jnp.argmax(logits, -1) == batch[1]
    return {"score": float(jnp.mean(right)), "loss": float(xent(logits, batch))}


def digits_task(steps: int, pretrain: int) -> Task:
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = digits_split()
    model = MLP()
    params = model.init(jax.random.key(0), x_tr[:1])["params"]
    old = y_tr < 5
    params, _ = train(
        lambda p, _, b: xent(model.apply({"params": p}, b[0]), b),
        params,
        None,
        sampler(x_tr[old], y_tr[old]),
        adam_tx(schedule_for(3e-3, pretrain)),
        steps=pretrain,
        key=jax.random.key(1),
    )
    new = lambda x, y: (jnp.asarray(x[y >= 5]), jnp.asarray(y[y >= 5]))  # noqa: E731
    return Task(
        "digits", model, params, r"hidden_[01]/kernel", 2, x_tr[:1],
        sampler(x_tr[y_tr >= 5], y_tr[y_tr >= 5]), xent, new(x_va, y_va), new(x_te, y_te),
        class_scores, steps, (1e-2, 3e-2, 1e-1, 3e-1), ("hidden_0/kernel", "hidden_1/kernel"),
        3e-2,
    )  # fmt: skip
