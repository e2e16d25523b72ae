"""End-to-end LoRA on real handwritten digits (scikit-learn's `load_digits`, offline).

1. Pretrain a small Flax MLP on digits 0-4.
2. Freeze it and LoRA-adapt it to digits 5-9 through `jlora.linen`: only the low-rank factors
   train, and the model's code is not touched.
3. Report trainable parameters, accuracy before and after, adapter vs base size, and check that the
   merged model predicts exactly what the factored one does.
4. Save the adapter checkpoint (orbax), restore it, and merge it into the base checkpoint on disk,
   leaf by leaf, as ``jlora merge`` does; the merged checkpoint equals the in-memory merge.

Run: ``bash scripts/main.sh`` (or ``python examples/digits.py --help``).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import trange

import jlora
import jlora.checkpoint
import jlora.linen


class MLP(nn.Module):
    """A plain Flax MLP, written with no thought of LoRA."""

    hidden: int = 128
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden, name="hidden_0")(x))
        x = nn.relu(nn.Dense(self.hidden, name="hidden_1")(x))
        return nn.Dense(self.classes, name="head")(x)


MODEL = MLP()


def predict(params: dict, x: jax.Array, adapters: dict | None = None, lora=None) -> jax.Array:
    """Logits of the base model, or of the LoRA-adapted one (factored: W0 + delta is never built)."""
    if adapters is None:
        return MODEL.apply({"params": params}, x)
    return lora.apply(params, adapters, x)


def loss_fn(params, x, y, adapters=None, lora=None):
    logits = predict(params, x, adapters, lora)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y, adapters=None, lora=None) -> float:
    return float(jnp.mean(jnp.argmax(predict(params, x, adapters, lora), -1) == y))


def batches(key, n, batch_size):
    perm = np.asarray(jax.random.permutation(key, n))
    for i in range(0, n - batch_size + 1, batch_size):
        yield perm[i : i + batch_size]


def train(label, loss, trainable, frozen, data, *, epochs, lr, seed):
    """Adam on `trainable`, the first argument of `loss(trainable, frozen, x, y)`.

    `frozen` is a separate argument, never differentiated: no gradient or optimizer state for it.
    """
    x, y = data
    tx = optax.adam(lr)
    # The step donates the trainable tree, so it runs on a copy: the caller's tree stays valid
    # (train may start twice from the same initial adapters).
    trainable = jax.tree.map(jnp.copy, trainable)
    opt_state = tx.init(trainable)

    # Donating the trainable tree and the optimizer state lets XLA update them in place: the step
    # holds one copy of each. `frozen` is not donated; it is read, never written.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, xb, yb):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    key = jax.random.key(seed)
    for _ in trange(epochs, desc=label, leave=False):
        key, sub = jax.random.split(key)
        for idx in batches(sub, len(x), 64):
            trainable, opt_state, _ = step(trainable, opt_state, frozen, x[idx], y[idx])
    return trainable


def du(directory: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def nbytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", default=None, help="where checkpoints go (default: a temp dir)"
    )
    args = parser.parse_args()
    start = time.perf_counter()

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target)
    x_tr, x_te, y_tr, y_te = (
        jnp.asarray(a)
        for a in train_test_split(
            np.asarray(x),
            np.asarray(y),
            test_size=0.3,
            random_state=args.seed,
            stratify=np.asarray(y),
        )
    )
    old_tr, new_tr = y_tr < 5, y_tr >= 5
    old_te, new_te = y_te < 5, y_te >= 5

    # 1. Pretrain on digits 0-4 (full fine-tune of every weight).
    params = MODEL.init(jax.random.key(args.seed), x_tr[:1])["params"]
    params = train(
        "pretrain 0-4",
        lambda p, _, xb, yb: loss_fn(p, xb, yb),
        params,
        None,
        (x_tr[old_tr], y_tr[old_tr]),
        epochs=args.epochs,
        lr=3e-3,
        seed=args.seed,
    )
    print(
        f"base model: accuracy on digits 0-4 {accuracy(params, x_te[old_te], y_te[old_te]):.3f}, "
        f"on digits 5-9 {accuracy(params, x_te[new_te], y_te[new_te]):.3f}"
    )

    # 2. LoRA on every kernel through the Linen transform: only the adapters are differentiated,
    #    the model's code is untouched, and W0 + delta is never built during training.
    config = jlora.LoraConfig(targets=r".*/kernel", rank=args.rank, alpha=args.alpha)
    lora = jlora.linen.lora(MODEL, config)
    adapters = lora.init_adapters(jax.random.key(args.seed + 1), params, x_tr[:1])
    print(jlora.count_params(params, adapters))
    before = accuracy(params, x_te[new_te], y_te[new_te], adapters, lora)
    adapters = train(
        "LoRA 5-9",
        lambda a, p, xb, yb: loss_fn(p, xb, yb, a, lora),
        adapters,
        params,
        (x_tr[new_tr], y_tr[new_tr]),
        epochs=args.epochs,
        lr=1e-2,
        seed=args.seed + 1,
    )
    after = accuracy(params, x_te[new_te], y_te[new_te], adapters, lora)
    print(f"LoRA r={args.rank}: accuracy on digits 5-9 before {before:.3f}, after {after:.3f}")

    # 3. Sizes, and the merged model against the factored one.
    print(
        f"adapter {nbytes(adapters):,} bytes vs base {nbytes(params):,} bytes "
        f"({nbytes(adapters) / nbytes(params):.1%})"
    )
    merged = jlora.merge(params, adapters)
    factored = predict(params, x_te, adapters, lora)
    merged_logits = predict(merged, x_te)
    factored_pred, merged_pred = jnp.argmax(factored, -1), jnp.argmax(merged_logits, -1)
    gap = float(jnp.max(jnp.abs(factored - merged_logits)))
    same = bool(jnp.all(factored_pred == merged_pred))
    print(f"merged vs factored: identical predictions {same}, max logit difference {gap:.2e}")
    if not same:
        raise SystemExit("merged and factored models disagree")

    # 4. Checkpoints: the adapter alone, restored against the base it was made for, merged on disk.
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="jlora-digits-"))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((work / "base").absolute(), params)
    jlora.checkpoint.save(work / "adapter", adapters, config, base=params)
    restored, _ = jlora.checkpoint.restore(work / "adapter", base=params)
    exact = all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(restored), strict=True)
    )
    summary = jlora.checkpoint.merge_checkpoint(work / "base", work / "adapter", work / "merged")
    print(f"checkpoint merge: {summary}")
    with ocp.StandardCheckpointer() as checkpointer:
        on_disk = checkpointer.restore((work / "merged").absolute())
    same_bits = all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(on_disk), strict=True)
    )
    print(
        f"adapter checkpoint {du(work / 'adapter'):,} bytes vs base checkpoint "
        f"{du(work / 'base'):,} bytes on disk; restored exactly {exact}; merged on disk equals "
        f"in-memory merge bit for bit {same_bits} ({work})"
    )
    if not (exact and same_bits):
        raise SystemExit("checkpoint round trip or disk merge disagrees")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
