"""The scanned decoder of ``models_linen``, Megatron-sharded on a ``(data, model)`` mesh.

Shared by the sharding tests and the multi-process worker, so that the sharded step, its
single-device reference and the two processes all run the very same model, data and step.

Megatron layout (Shoeybi et al. 2019): the query/key/value and MLP ``up`` projections are
column-parallel (fan-out split over ``model``), the attention ``out`` and MLP ``down`` projections
row-parallel (fan-in split over ``model``), and the embedding is vocab-parallel (rows split over
``model``; its ``attend`` output head then yields vocab-split logits). ``fsdp="data"`` also splits
the other axis of every such weight over ``data``, the 2-D (FSDP x TP) layout of large runs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from models_linen import Decoder, random_variables

import jlora
import jlora.linen

# Sizes: the model axis (4) divides heads, d_ff and vocab; the rank (7) differs from every other
# size, so a rank-sized array in a compiled program is recognisable.
MODEL = Decoder(vocab=20, d_model=16, heads=4, head_dim=6, d_ff=40, layers=3)
BATCH, SEQ = 6, 9
RANK = 7
LR = 1e-2  # Adam's learning rate in every run
LAYOUTS = {
    "embed/embedding": "vo",
    "layers/attn/query/kernel": "sioo",
    "layers/attn/key/kernel": "sioo",
    "layers/attn/value/kernel": "sioo",
    "layers/attn/out/kernel": "siio",
    "layers/up/kernel": "sio",
    "layers/down/kernel": "sio",
}
CONFIG = jlora.LoraConfig(targets=tuple(LAYOUTS), rank=RANK, alpha=2.0 * RANK, layouts=LAYOUTS)
ADAPTED = jlora.linen.lora(MODEL, CONFIG)


def batch(seed: int = 0):
    """Next-token ids ``(x, y)``, each ``(BATCH, SEQ)`` int32."""
    ids = np.random.default_rng(seed).integers(0, MODEL.vocab, size=(BATCH, SEQ + 1))
    ids = ids.astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def params(seed: int = 0):
    """The decoder's params, NumPy random (the same in every process)."""
    return random_variables(MODEL, batch()[0], seed)["params"]


def specs(params, *, fsdp: str | None = None):
    """PartitionSpecs for the params: Megatron over ``model``, optionally FSDP over ``fsdp``."""

    def spec(path, leaf):
        name = jlora._paths.path_to_str(path)
        layer, leaf_name = name.split("/")[-2:]
        if name == "embed/embedding":
            return P("model", fsdp)
        if not name.startswith("layers/"):
            return P()
        if layer in ("query", "key", "value"):  # (L, d, heads, head_dim)
            return P(None, fsdp, "model", None) if leaf_name == "kernel" else P(None, "model")
        if layer == "up":  # (L, d, d_ff)
            return P(None, fsdp, "model") if leaf_name == "kernel" else P(None, "model")
        if layer == "out" and leaf_name == "kernel":  # (L, heads, head_dim, d)
            return P(None, "model", None, fsdp)
        if layer == "down" and leaf_name == "kernel":  # (L, d_ff, d)
            return P(None, "model", fsdp)
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def lora_step(tx):
    """``(adapters, opt_state, params, x, y) -> (adapters, opt_state, loss)``: one LoRA step."""

    def step(adapters, opt_state, params, x, y):
        loss, grads = jax.value_and_grad(lambda a: xent(ADAPTED.apply(params, a, x), y))(adapters)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
            updates, opt_state = tx.update(grads, opt_state, adapters)
            adapters = optax.apply_updates(adapters, updates)
        return adapters, opt_state, loss

    return step


def initial_adapters(params):
    """The adapters ``train`` starts from: ``jlora.sharding.init`` on the params' shardings."""
    from jlora import sharding as lsh

    return lsh.init(jax.random.key(1), params, CONFIG)


def train(params, x, y, steps: int):
    """Sharded adapters from ``lsh.init``, trained ``steps`` Adam steps: ``(losses, adapters)``."""
    adapters = initial_adapters(params)
    tx = optax.adam(LR)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = jax.jit(tx.init)(adapters)
    step = jax.jit(lora_step(tx))
    losses = []
    for _ in range(steps):
        adapters, opt_state, loss = step(adapters, opt_state, params, x, y)
        losses.append(float(loss))  # replicated: every process holds the value
    return np.array(losses), adapters


def floor_step(params, x, y, offset):
    """The frozen-base step: loss and its gradient with respect to the embedded tokens only.

    ``offset`` is added to the embedding lookup's output, so differentiating with respect to it
    runs the base forward and the backward pass for activations through every layer, with no
    weight gradient: the least a LoRA step must do.
    """

    def loss(offset):
        def add_offset(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
                return out + offset
            return out

        with nn.intercept_methods(add_offset):
            return xent(MODEL.apply({"params": params}, x), y)

    return jax.value_and_grad(loss)(offset)
