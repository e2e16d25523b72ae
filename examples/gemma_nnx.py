"""LoRA on a Gemma-architecture model written the way Gemma writes it, through ``jlora.nnx``.

The model below follows Gemma's published structure (Gemma Team 2024, 2025; the layer names and
einsum equations of Google DeepMind's ``gemma`` package), in ``flax.nnx``, with nothing shaped for
LoRA:

* an embedder that *subclasses* ``nnx.Embed``: its ``__call__`` scales the looked-up rows by
  ``sqrt(embed_dim)`` around ``super().__call__``, and ``decode`` (the tied output head) is
  ``attend``;
* grouped-query attention over ``nnx.Einsum`` layers whose kernels are not ``(in, out)``: query
  ``'BTD,NDH->BTNH'`` (kernel ``(heads, embed_dim, head_dim)``), stacked key/value
  ``'BSD,CKDH->CBSKH'`` (``(2, kv_heads, embed_dim, head_dim)``) and output ``'BTNH,NHD->BTD'``;
  RoPE; RMSNorm on queries and keys (Gemma 3); a left-aligned KV cache for decoding;
* pre- and post-norms (RMSNorm with ``1 + scale``) around attention and the MLP, a gated GELU MLP
  whose gate and up projections are one einsum ``'...F,NHF->...NH'`` (kernel
  ``(2, hidden, embed_dim)``), and ``'...H,HF->...F'`` down.

``main`` pretrains a tiny random model to copy sequences, adapts every one of those layers
(``jlora.nnx.lora`` infers each einsum's layout from its equation), trains only the factors to
reverse sequences, merges them into a plain model (``jlora.nnx.merge``) and checks it: same logits
to float32 round-off, its layers of their original classes, and the same greedy tokens from a
cached decode (adapters applied inside the jitted decode step) as from the merged model and from
decoding without a cache. Offline, on a CPU, in well under a minute:

    .venv/bin/python examples/gemma_nnx.py

Where Google DeepMind's ``gemma`` package is installed (4.x, Python 3.12+; its models are Linen),
``main`` also runs the package's own ``gm.nn.Transformer`` on the same weights, base and merged,
and prints how far its logits are from this model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jlora
import jlora.nnx

K_MASK = -2.3819763e38  # Gemma's logit for masked-out keys


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Sizes of a Gemma-architecture decoder (defaults: a tiny one)."""

    vocab_size: int = 64
    num_layers: int = 2
    embed_dim: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    hidden_dim: int = 64
    rope_base_frequency: int = 10_000
    use_qk_norm: bool = True


# Module names (matched at any depth): attention q, kv and output, both MLP einsums, the embedder.
TARGETS = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear", "embedder")


def _fan_in_init(in_axis: int | tuple[int, ...], out_axis: int | tuple[int, ...]):
    # LeCun normal over the axes an einsum kernel actually contracts and produces.
    return nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis, out_axis)


class Embedder(nnx.Embed):
    """Token embeddings scaled by ``sqrt(embed_dim)``; ``decode`` is the tied output head."""

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = super().__call__(tokens)
        return x * jnp.sqrt(jnp.asarray(self.features, x.dtype))

    def decode(self, x: jax.Array) -> jax.Array:
        """Logits ``(..., vocab)`` from hidden states ``(..., embed_dim)``."""
        return self.attend(x)


class RMSNorm(nnx.Module):
    """``x / rms(x) * (1 + scale)`` over the last axis, ``scale`` starting at 0."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        normed = x * jax.lax.rsqrt(var + 1e-6)
        scale = jnp.expand_dims(self.scale[...], tuple(range(x.ndim - 1)))
        return normed * (1 + scale)


def apply_rope(x: jax.Array, positions: jax.Array, base_frequency: int) -> jax.Array:
    """Rotary position embedding of ``x: (B, T, heads, head_dim)`` at ``positions: (B, T)``.

    Gemma's form: the first and second halves of each head are the two coordinates rotated by
    ``position / base_frequency ** (2 i / head_dim)``.
    """
    head_dim = x.shape[-1]
    fraction = 2 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
    timescale = base_frequency**fraction
    angle = positions.astype(jnp.float32)[..., None] / timescale[None, None, :]
    sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
    first, second = jnp.split(x, 2, axis=-1)
    rotated = [first * cos - second * sin, second * cos + first * sin]
    return jnp.concatenate(rotated, axis=-1).astype(x.dtype)


LayerCache = dict[str, jax.Array]


class Attention(nnx.Module):
    """Grouped-query attention with RoPE and an optional left-aligned KV cache."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        c = config
        if c.num_heads % c.num_kv_heads:
            raise ValueError(f"num_heads={c.num_heads} is not a multiple of {c.num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.rope_base_frequency = c.rope_base_frequency
        self.q_einsum = nnx.Einsum(
            "BTD,NDH->BTNH",
            (c.num_heads, c.embed_dim, c.head_dim),
            kernel_init=_fan_in_init(1, (0, 2)),
            rngs=rngs,
        )
        self.kv_einsum = nnx.Einsum(
            "BSD,CKDH->CBSKH",
            (2, c.num_kv_heads, c.embed_dim, c.head_dim),
            kernel_init=_fan_in_init(2, (0, 1, 3)),
            rngs=rngs,
        )
        self.attn_vec_einsum = nnx.Einsum(
            "BTNH,NHD->BTD",
            (c.num_heads, c.head_dim, c.embed_dim),
            kernel_init=_fan_in_init((0, 1), 2),
            rngs=rngs,
        )
        if c.use_qk_norm:
            self.query_norm = RMSNorm(c.head_dim, rngs=rngs)
            self.key_norm = RMSNorm(c.head_dim, rngs=rngs)
        else:
            self.query_norm = self.key_norm = None

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: LayerCache | None, mask: jax.Array
    ) -> tuple[LayerCache | None, jax.Array]:
        """``x: (B, T, D)``, ``positions: (B, T)``, ``mask: (B, T, S)`` (True: may attend), ``S``
        the cache size, or ``T`` without a cache. Returns the updated cache and ``(B, T, D)``."""
        query = self.q_einsum(x)
        key, value = self.kv_einsum(x)
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        query = apply_rope(query, positions, self.rope_base_frequency) * self.head_dim**-0.5
        key = apply_rope(key, positions, self.rope_base_frequency)
        if cache is not None:  # left-aligned: this call's keys and values go at end_index
            start = (0, cache["end_index"][0], 0, 0)
            key = jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), start)
            value = jax.lax.dynamic_update_slice(cache["v"], value.astype(cache["v"].dtype), start)
        b, t, _, h = query.shape
        groups = self.num_heads // self.num_kv_heads
        grouped = query.reshape(b, t, self.num_kv_heads, groups, h)
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", grouped, key).reshape(b, t, self.num_heads, -1)
        logits = jnp.where(mask[:, :, None, :], logits, K_MASK)
        probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        probs = probs.reshape(b, t, self.num_kv_heads, groups, -1)
        encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value).reshape(b, t, self.num_heads, h)
        out = self.attn_vec_einsum(encoded)
        if cache is None:
            return None, out
        return {"k": key, "v": value, "end_index": cache["end_index"] + t}, out

    def init_cache(self, batch: int, size: int, dtype=jnp.float32) -> LayerCache:
        shape = (batch, size, self.num_kv_heads, self.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "end_index": jnp.zeros((batch,), jnp.int32),
        }


class FeedForward(nnx.Module):
    """Gated GELU MLP: ``gelu(x W_gate) * (x W_up)``, then down; gate and up are one einsum."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        d, f = config.embed_dim, config.hidden_dim
        self.gating_einsum = nnx.Einsum(
            "...F,NHF->...NH", (2, f, d), kernel_init=_fan_in_init(2, (0, 1)), rngs=rngs
        )
        self.linear = nnx.Einsum("...H,HF->...F", (f, d), kernel_init=_fan_in_init(0, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.gating_einsum(x)  # (..., 2, hidden)
        return self.linear(jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :])


class Block(nnx.Module):
    """Pre- and post-normed attention and MLP, each added to the residual stream."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        d = config.embed_dim
        self.pre_attention_norm = RMSNorm(d, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.post_attention_norm = RMSNorm(d, rngs=rngs)
        self.pre_ffw_norm = RMSNorm(d, rngs=rngs)
        self.mlp = FeedForward(config, rngs=rngs)
        self.post_ffw_norm = RMSNorm(d, rngs=rngs)

    def __call__(self, x, positions, cache, mask):
        cache, attn = self.attn(self.pre_attention_norm(x), positions, cache, mask)
        x = x + self.post_attention_norm(attn)
        return cache, x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))


class Gemma(nnx.Module):
    """Token ids ``(B, T)`` to next-token logits ``(B, T, vocab)`` (and the updated cache)."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = Embedder(config.vocab_size, config.embed_dim, rngs=rngs)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.embed_dim, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: list[LayerCache] | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, list[LayerCache] | None]:
        """Without a cache, positions default to ``0 .. T-1`` and the mask to causal."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if mask is None:
            mask = causal_mask(positions, t)
        x = self.embedder(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache, x = layer(x, positions, None if cache is None else cache[i], mask)
            new_cache.append(layer_cache)
        logits = self.embedder.decode(self.final_norm(x))
        return logits, (None if cache is None else new_cache)

    def init_cache(self, batch: int, size: int, dtype=jnp.float32) -> list[LayerCache]:
        return [layer.attn.init_cache(batch, size, dtype) for layer in self.layers]


def causal_mask(positions: jax.Array, size: int) -> jax.Array:
    """``(B, T, size)``: query at ``positions`` may attend to key slots ``0 .. position``."""
    return jnp.arange(size, dtype=positions.dtype)[None, None, :] <= positions[:, :, None]


# --- greedy decoding --------------------------------------------------------------------------


@nnx.jit(static_argnames="size")
def _cached_step(model: Gemma, tokens, positions, cache, size: int):
    logits, cache = model(tokens, positions, cache, causal_mask(positions, size))
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def generate(model: Gemma, prompt: jax.Array, steps: int) -> jax.Array:
    """Greedy decoding with a KV cache: ``(B, steps)`` tokens after ``prompt: (B, P)``.

    The prompt fills the cache in one call (prefill); each further token is one jitted call that
    reads the cache and appends its own key and value.
    """
    b, p = prompt.shape
    size = p + steps
    cache = model.init_cache(b, size)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    token, cache = _cached_step(model, prompt, positions, cache, size=size)
    out = [token]
    for i in range(steps - 1):
        positions = jnp.full((b, 1), p + i, jnp.int32)
        token, cache = _cached_step(model, token[:, None], positions, cache, size=size)
        out.append(token)
    return jnp.stack(out, axis=1)


@nnx.jit
def _full_step(model: Gemma, tokens, index: jax.Array):
    logits, _ = model(tokens)  # causal: the tokens after ``index`` do not reach it
    return jnp.argmax(logits[:, index], axis=-1).astype(jnp.int32)


def generate_without_cache(model: Gemma, prompt: jax.Array, steps: int) -> jax.Array:
    """Greedy decoding that reruns the whole sequence for each token (the cache's reference).

    The sequence is padded to its final length, so every call has the same shape.
    """
    b, p = prompt.shape
    tokens = jnp.concatenate([prompt, jnp.zeros((b, steps), prompt.dtype)], axis=1)
    for i in range(steps):
        tokens = tokens.at[:, p + i].set(_full_step(model, tokens, jnp.int32(p + i - 1)))
    return tokens[:, p:]


# --- the gemma package (optional) --------------------------------------------------------------


def gemma_package_model(config: GemmaConfig):
    """Google DeepMind's own (Linen) ``gm.nn.Transformer`` with this config, or None if the
    ``gemma`` package (4.x, Python 3.12+) is not installed."""
    try:
        from gemma import gm
    except ImportError:
        return None
    c = config
    return gm.nn.Transformer(
        config=gm.nn.config.TransformerConfig(
            num_embed=c.vocab_size,
            embed_dim=c.embed_dim,
            hidden_dim=c.hidden_dim,
            num_heads=c.num_heads,
            head_dim=c.head_dim,
            num_kv_heads=c.num_kv_heads,
            final_logit_softcap=None,
            use_post_attn_norm=True,
            use_post_ffw_norm=True,
            attention_types=(gm.nn.AttentionType.GLOBAL,) * c.num_layers,
            transpose_gating_einsum=True,  # the gating kernel as (2, hidden, embed_dim)
            use_qk_norm=c.use_qk_norm,
            global_base_frequency=c.rope_base_frequency,
        )
    )


def gemma_package_paths(config: GemmaConfig) -> dict[str, str]:
    """``{path in gm.nn.Transformer's params: path in Gemma's nnx.Param state}``."""
    paths = {
        "embedder/input_embedding": "embedder/embedding",
        "final_norm/scale": "final_norm/scale",
    }
    for i in range(config.num_layers):
        ours, theirs = f"layers/{i}", f"layer_{i}"
        for name in ("q_einsum", "kv_einsum", "attn_vec_einsum"):
            paths[f"{theirs}/attn/{name}/w"] = f"{ours}/attn/{name}/kernel"
        if config.use_qk_norm:
            paths[f"{theirs}/attn/_query_norm/scale"] = f"{ours}/attn/query_norm/scale"
            paths[f"{theirs}/attn/_key_norm/scale"] = f"{ours}/attn/key_norm/scale"
        for name in ("gating_einsum", "linear"):
            paths[f"{theirs}/mlp/{name}"] = f"{ours}/mlp/{name}/kernel"
        for name in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            paths[f"{theirs}/{name}/scale"] = f"{ours}/{name}/scale"
    return paths


def to_gemma_package_params(model: Gemma) -> dict:
    """The params of a (plain) ``Gemma`` as ``gm.nn.Transformer`` names them, for its ``apply``."""
    flat = {
        "/".join(map(str, path)): var[...]
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    params: dict = {}
    for theirs, ours in gemma_package_paths(model.config).items():
        *parents, leaf = theirs.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = flat[ours]
    return params


def gemma_package_logits(config: GemmaConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """Logits of the ``gemma`` package's own Transformer (see :func:`gemma_package_model`)."""
    # The package relies on implicit dtype and rank promotion, which strict settings refuse.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        return gemma_package_model(config).apply({"params": params}, tokens).logits


# --- the tasks --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """Sequences ``[bos] x_1 .. x_n [sep] y_1 .. y_n``, ``y`` = ``x`` copied or reversed."""

    length: int = 8
    symbols: int = 16
    bos: int = 1
    sep: int = 2
    first_symbol: int = 3

    def batch(self, key: jax.Array, size: int, reverse: bool) -> jax.Array:
        x = jax.random.randint(key, (size, self.length), 0, self.symbols) + self.first_symbol
        y = x[:, ::-1] if reverse else x
        column = lambda t: jnp.full((size, 1), t, x.dtype)  # noqa: E731
        return jnp.concatenate([column(self.bos), x, column(self.sep), y], axis=1).astype(jnp.int32)

    def prompt(self, tokens: jax.Array) -> jax.Array:
        return tokens[:, : self.length + 2]

    def answer(self, tokens: jax.Array) -> jax.Array:
        return tokens[:, self.length + 2 :]


def answer_loss_and_accuracy(model: Gemma, tokens: jax.Array, task: Task):
    """Next-token cross-entropy and token accuracy on the answer ``y`` (teacher forcing), and the
    logits ``(B, T - 1, vocab)``."""
    logits, _ = model(tokens[:, :-1])
    answer = logits[:, task.length + 1 :]  # the positions that predict y_1 .. y_n
    labels = task.answer(tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(answer, labels).mean()
    return loss, (jnp.mean(jnp.argmax(answer, axis=-1) == labels), logits)


@nnx.jit(static_argnames="task")
def train_step(model: Gemma, optimizer: nnx.Optimizer, tokens: jax.Array, task: Task):
    """One Adam step on what ``optimizer`` was built to train (its ``wrt`` filter)."""

    def loss_fn(model):
        return answer_loss_and_accuracy(model, tokens, task)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)
    (loss, (accuracy, _)), grads = grad_fn(model)
    optimizer.update(model, grads)
    return loss, accuracy


@nnx.jit(static_argnames="task")
def evaluate(model: Gemma, tokens: jax.Array, task: Task):
    """``(loss, accuracy, logits)`` of :func:`answer_loss_and_accuracy`, jitted."""
    loss, (accuracy, logits) = answer_loss_and_accuracy(model, tokens, task)
    return loss, accuracy, logits


def train(model, wrt, task: Task, *, reverse: bool, steps: int, lr: float, seed: int, log=print):
    """Trains the ``wrt`` variables of ``model`` in place; logs loss and accuracy every 100 steps."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)
    step_fn = nnx.cached_partial(train_step, model, optimizer)  # traverses the graph once
    key = jax.random.key(seed)
    for step in range(1, steps + 1):
        key, sub = jax.random.split(key)
        loss, accuracy = step_fn(task.batch(sub, 64, reverse), task)
        if step % 100 == 0 or step == 1:
            log(f"  step {step:4d}  loss {float(loss):.3f}  token accuracy {float(accuracy):.2f}")
    return model


def lora_config(rank: int = 4) -> jlora.LoraConfig:
    """Adapters on q, kv, the attention output, both MLP einsums and the embedder."""
    return jlora.LoraConfig(targets=TARGETS, rank=rank, alpha=2.0 * rank)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--adapt-steps", type=int, default=400)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    config, task = GemmaConfig(), Task()
    test = task.batch(jax.random.key(100), 256, reverse=True)

    model = Gemma(config, rngs=nnx.Rngs(0))
    print(f"Gemma-architecture model, random init: {config}")
    print(f"pretraining all {_count(model, nnx.Param):,} parameters to copy sequences:")
    train(model, nnx.Param, task, reverse=False, steps=args.pretrain_steps, lr=3e-3, seed=1)
    copy_accuracy = float(evaluate(model, task.batch(jax.random.key(101), 256, False), task)[1])
    before = float(evaluate(model, test, task)[1])
    print(f"base model: copy accuracy {copy_accuracy:.2f}, reverse accuracy {before:.2f}")

    base_logits, _ = model(test[:8, :-1])  # eager, to compare bit for bit
    package = gemma_package_model(config) is not None
    if package:
        theirs = gemma_package_logits(config, to_gemma_package_params(model), test[:8, :-1])
        print(
            f"the gemma package's gm.nn.Transformer on these weights: logits within "
            f"{_relative(base_logits, theirs):.1e} of max |logits|"
        )
    base_params = nnx.clone(nnx.state(model, nnx.Param))
    jlora.nnx.lora(model, lora_config(), rngs=nnx.Rngs(params=2))
    same_at_init = bool(np.array_equal(model(test[:8, :-1])[0], base_logits))
    print(f"adapted; equals the base at init (eager, bit for bit): {same_at_init}")
    print(jlora.nnx.summary(model))

    print("training the LoRA factors only (wrt=jlora.nnx.LoraParam) to reverse sequences:")
    train(model, jlora.nnx.LoraParam, task, reverse=True, steps=args.adapt_steps, lr=1e-2, seed=3)
    loss, after, got = evaluate(model, test, task)
    after = float(after)
    untouched = all(
        np.array_equal(x, y)
        for x, y in zip(
            jax.tree.leaves(base_params), jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True
        )
    )
    print(
        f"reverse accuracy {before:.2f} -> {after:.2f} (loss {float(loss):.3f}); base "
        f"parameters untouched: {untouched}"
    )

    merged = jlora.nnx.merge(model)
    plain = (
        type(merged.embedder) is Embedder
        and type(merged.layers[0].attn.q_einsum) is nnx.Einsum
        and not jax.tree.leaves(nnx.state(merged, jlora.nnx.LoraParam))
    )
    want = evaluate(merged, test, task)[2]
    error = _relative(got, want)
    print(
        f"merged: original classes, no LoraParam left: {plain}; logits "
        f"max |adapted - merged| / max |logits| = {error:.1e}"
    )
    package_error = None
    if package:
        theirs = gemma_package_logits(config, to_gemma_package_params(merged), test[:8, :-1])
        package_error = _relative(got[:8], theirs)
        print(
            f"the gemma package's gm.nn.Transformer on the merged weights: within "
            f"{package_error:.1e} of the adapted model's logits"
        )

    prompt, answer = task.prompt(test[:64]), task.answer(test[:64])
    adapted_tokens = generate(model, prompt, task.length)
    merged_tokens = generate(merged, prompt, task.length)
    uncached_tokens = generate_without_cache(model, prompt, task.length)
    exact = float(jnp.mean(jnp.all(adapted_tokens == answer, axis=1)))
    same = bool(jnp.array_equal(adapted_tokens, merged_tokens))
    same_uncached = bool(jnp.array_equal(adapted_tokens, uncached_tokens))
    print(
        f"greedy decoding with a KV cache: {exact:.2f} of answers exactly reversed; same tokens "
        f"as the merged model: {same}, as decoding without a cache: {same_uncached}"
    )
    print(f"done in {time.perf_counter() - start:.0f} s")
    return {
        "copy_accuracy": copy_accuracy,
        "before": before,
        "after": after,
        "same_at_init": same_at_init,
        "untouched": untouched,
        "plain": plain,
        "error": error,
        "exact": exact,
        "same_tokens": same and same_uncached,
        "package_error": package_error,
    }


def _relative(got: jax.Array, want: jax.Array) -> float:
    """``max |got - want| / max |want|``."""
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def _count(model: nnx.Module, wrt) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))


if __name__ == "__main__":
    main()
