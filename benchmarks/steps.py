"""The JAX train steps the benchmark compares, all on the same Linen weights and batch.

*full* (Adam on every weight), *floor* (frozen forward plus the backward pass for activations only:
no weight gradient, no optimizer; no LoRA step can be cheaper), jlora (factored), *merged-per-step*
(rebuild ``W0 + delta`` inside the step), and the JAX peers: Flax NNX's ``nnx.LoRALinear`` and
qwix. Every adapter step is the same optax Adam step over the trainable tree only, jitted with the
trainable tree and optimizer state donated.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import decoder_nnx
import jax
import jax.numpy as jnp
import optax
import peer_qwix
from decoder import Decoder, Size, next_token_loss
from flax import nnx

import jlora
import jlora.linen

ALL_LINEAR = r".*/(query|key|value|out|up|down)/kernel"
QV = r".*/(query|value)/kernel"
TARGETS = {"all linear": ALL_LINEAR, "q, v": QV}


def _copy(tree: Any) -> Any:
    """A fresh copy for a step that donates (deletes) its inputs."""
    return jax.tree.map(jnp.copy, tree)


def adapter_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
    """``(trainable, opt_state, frozen, tokens) -> (trainable, opt_state, loss)``, jitted."""

    def step(trainable, opt_state, frozen, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def build(
    model: Decoder,
    size: Size,
    dtype: Any,
    *,
    rank: int,
    alpha: float,
    remat: str,
    remat_policy: str,
    peers: dict,
) -> dict[str, Any]:
    """Every JAX case as ``name -> (jitted step, args, carry)``, plus what inference needs.

    ``remat`` is ``'off'``, ``'on'`` or ``'both'``: jlora steps on the plain decoder, on one whose
    blocks are ``nn.remat`` with ``remat_policy`` (a key of ``decoder.REMAT_POLICIES``; the backward
    pass then recomputes the adapters' inputs, among what the policy does not save), or both.
    ``peers`` maps ``'nnx'``/``'qwix'`` to whether to build them.
    """
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (size.batch, size.seq), 0, size.vocab)
    params = model.init(key, tokens)["params"]
    tx = optax.adam(1e-3)

    def full(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(
            lambda p: next_token_loss(model.apply({"params": p}, tokens), tokens)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def floor(params, tokens):
        h0 = jnp.zeros((*tokens.shape, size.d_model), dtype)
        return jax.value_and_grad(
            lambda h: next_token_loss(model.apply({"params": params}, tokens, h), tokens)
        )(h0)

    cases: dict[str, tuple] = {
        "full": (
            jax.jit(full, donate_argnums=(0, 1)),
            (_copy(params), tx.init(params), tokens),
            2,
            2,
        ),
        "floor": (jax.jit(floor), (params, tokens), 0, 0),
    }
    remats = {"off": (False,), "on": (True,), "both": (False, True)}[remat]
    inference = None
    rematted = dataclasses.replace(model, remat=remat_policy)
    for label, targets in TARGETS.items():
        config = jlora.LoraConfig(targets=targets, rank=rank, alpha=alpha)
        lora = jlora.linen.lora(model, config)
        adapters = lora.init_adapters(jax.random.key(1), params, tokens)
        for recompute in remats:
            used = jlora.linen.lora(rematted, config) if recompute else lora

            def loss_fn(adapters, params, tokens, used=used):
                return next_token_loss(used.apply(params, adapters, tokens), tokens)

            name = f"jlora ({label}{f', remat {remat_policy}' if recompute else ''})"
            args = (_copy(adapters), tx.init(adapters), params, tokens)
            cases[name] = (adapter_step(loss_fn, tx), args, 2, 2)
        if targets == ALL_LINEAR:
            inference = (lora, adapters)

            def merged_loss(adapters, params, tokens):
                merged = jlora.merge(params, adapters)
                return next_token_loss(model.apply({"params": merged}, tokens), tokens)

            args = (_copy(adapters), tx.init(adapters), params, tokens)
            cases["merged-per-step"] = (adapter_step(merged_loss, tx), args, 2, 2)

    if peers.get("nnx"):
        for label, targets in TARGETS.items():
            names = tuple(n for n in decoder_nnx.PROJECTIONS if f"/{n}/" in _example(targets))
            net = decoder_nnx.Decoder(size, dtype, lora=names, rank=rank, rngs=nnx.Rngs(0))
            decoder_nnx.load_linen_params(net, params)
            graphdef, lora_state, rest = nnx.split(net, nnx.LoRAParam, ...)

            def nnx_loss(lora_state, rest, tokens, graphdef=graphdef):
                return next_token_loss(nnx.merge(graphdef, lora_state, rest)(tokens), tokens)

            args = (_copy(lora_state), tx.init(lora_state), rest, tokens)
            cases[f"nnx.LoRA ({label})"] = (adapter_step(nnx_loss, tx), args, 2, 2)
    if peers.get("qwix"):
        for label, targets in TARGETS.items():
            lora_params, apply = peer_qwix.build(
                model, params, tokens, targets, rank=rank, alpha=alpha
            )

            def qwix_loss(lora_params, params, tokens, apply=apply):
                return next_token_loss(apply(lora_params, params, tokens), tokens)

            args = (_copy(lora_params), tx.init(lora_params), params, tokens)
            cases[f"qwix ({label})"] = (adapter_step(qwix_loss, tx), args, 2, 2)
    return {"cases": cases, "params": params, "tokens": tokens, "inference": inference}


def _example(regex: str) -> str:
    """The projection names a target regex selects, as one string of ``/name/`` parts."""
    return "".join(
        f"/{n}/" for n in decoder_nnx.PROJECTIONS if re.fullmatch(regex, f"layers_0/{n}/kernel")
    )
