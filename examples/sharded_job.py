"""The TPU fine-tuning job on 8 fake CPU devices: FSDP x tensor parallel, in Flax's own idioms.

A decoder written the way large Flax models are (``nn.with_logical_partitioning`` on every weight,
``nn.scan`` over layers with a ``layers`` axis) is LoRA-tuned on a ``2 x 4`` ``(data, model)``
mesh. Nothing in the job names a mesh axis per weight: the user's ``logical_axis_rules`` shard the
base, and the same rules shard the factors, whose logical names jlora derives from the weights'
(``a``: stack and fan-in names plus ``lora_rank``; ``b``: ``lora_rank`` plus stack and fan-out
names). The rank axis is unmapped, so replicated.

1. Params are created sharded (``jax.jit`` with ``out_shardings`` from the rules), so no device
   ever holds the whole base; the adapters likewise.
2. The LoRA step is jitted with its shardings (``in_shardings``/``out_shardings``, buffers
   donated) and trains the factors with Adam.
3. Halfway, the adapters and optimizer state go to one orbax ``CheckpointManager`` step (each
   process writes only its shards), are restored onto their shardings, and training resumes; the
   result equals the uninterrupted run's bit for bit (the same compiled program on the same data).
4. ``compiled.memory_analysis()`` of the LoRA step, the frozen-base floor (backward for
   activations only) and a full fine-tune, per device.

Run: ``python examples/sharded_job.py`` (about 20 s on 2 cores). A real job changes the mesh (e.g.
``jax.make_mesh((n_hosts, chips_per_host), ("data", "model"))``) and nothing else.
"""

from __future__ import annotations

import os

if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):  # 8 fake CPU devices; must be set before jax initialises its backend
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import argparse
import dataclasses
import functools
import pathlib
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
import jlora.checkpoint
import jlora.linen
from jlora.sharding import RANK_AXIS, check_factor_shardings

# FSDP x TP: `embed` over `data` (each weight's d_model axis is split over the data-parallel
# devices), heads, MLP width and vocabulary over `model`. The rank axis is listed to show where a
# user would map it; mapping it to a mesh axis is refused (every device needs all of `x a`).
RULES = (
    ("batch", "data"),
    ("embed", "data"),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("layers", None),
    (RANK_AXIS, None),
)


def _init(names: tuple[str, ...], init: Any = None) -> Any:
    return nn.with_logical_partitioning(init or nn.initializers.normal(0.05), names)


class Block(nn.Module):
    """A pre-norm decoder block, ``nn.scan``-shaped ``(carry, _) -> (carry, None)``."""

    heads: int
    head_dim: int
    d_ff: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        d, t = x.shape[-1], x.shape[-2]
        h = nn.RMSNorm(scale_init=_init(("embed",), nn.initializers.ones))(x)
        q, k, v = (
            nn.DenseGeneral(
                (self.heads, self.head_dim),
                use_bias=False,
                kernel_init=_init(("embed", "heads", "kv")),
                name=name,
            )(h)
            for name in ("query", "key", "value")
        )
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim).astype(np.float32)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), v)
        out = nn.DenseGeneral(
            d,
            axis=(-2, -1),
            use_bias=False,
            kernel_init=_init(("heads", "kv", "embed")),
            name="out",
        )
        x = x + out(o)
        h = nn.RMSNorm(scale_init=_init(("embed",), nn.initializers.ones))(x)
        h = nn.Dense(self.d_ff, use_bias=False, kernel_init=_init(("embed", "mlp")), name="up")(h)
        down = nn.Dense(d, use_bias=False, kernel_init=_init(("mlp", "embed")), name="down")
        return x + down(jax.nn.gelu(h)), None


class Decoder(nn.Module):
    """Token embedding (tied output head), ``layers`` scanned blocks, final norm."""

    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    head_dim: int = 8
    d_ff: int = 64
    layers: int = 2

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(
            self.vocab,
            self.d_model,
            embedding_init=_init(("vocab", "embed"), nn.initializers.normal(0.2)),
            name="embed",
        )
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(self.heads, self.head_dim, self.d_ff, name="layers")(embed(tokens), None)
        return embed.attend(nn.RMSNorm(scale_init=_init(("embed",), nn.initializers.ones))(x))


def batch(vocab: int, size: int, seq: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Step ``step``'s ``(tokens, labels)``: sequences counting up by a per-sequence stride, which
    the adapters learn to continue. Made from the step number, so a resumed run sees the same."""
    rng = np.random.default_rng(step)
    start = rng.integers(0, vocab, size=(size, 1))
    stride = rng.integers(1, 3, size=(size, 1))
    ids = ((start + stride * np.arange(seq + 1)) % vocab).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything the job fixes before training: model, mesh, shardings, jitted steps."""

    model: Decoder
    mesh: Mesh
    adapted: jlora.linen.LoraModel
    params: Any  # boxed, sharded
    abstract_adapters: Any  # boxed jax.ShapeDtypeStruct tree
    adapter_shardings: Any
    tx: optax.GradientTransformation
    batch_size: int
    seq: int

    @property
    def on_batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, nn.logical_to_mesh_axes(("batch", None), RULES))

    def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
        x, y = batch(self.model.vocab, self.batch_size, self.seq, step)
        return jax.device_put(x, self.on_batch), jax.device_put(y, self.on_batch)

    def start(self, key: jax.Array) -> tuple[Any, Any]:
        """Fresh adapters and Adam state, created on their shardings."""
        init = jax.jit(self.adapted.init_adapters, out_shardings=self.adapter_shardings)
        adapters = init(key, self.params, self.batch(0)[0])
        return adapters, self.init_opt(adapters)

    @functools.cached_property
    def init_opt(self):
        return jax.jit(self.tx.init)  # Adam's moments inherit the factors' shardings

    def shardings(self, tree: Any) -> Any:
        """The rules' shardings for a (boxed) tree; unboxed leaves are replicated."""
        return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), self.mesh, RULES)

    @functools.cached_property
    def opt_shardings(self) -> Any:
        # Adam's moments keep the factors' boxes, so the rules shard them like the factors.
        return self.shardings(jax.eval_shape(self.tx.init, self.abstract_adapters))

    @functools.cached_property
    def step(self):
        """The LoRA step, jitted with its shardings; adapters and optimizer state are donated."""

        def step(adapters, opt_state, params, x, y):
            loss, grads = jax.value_and_grad(lambda a: xent(self.adapted.apply(params, a, x), y))(
                adapters
            )
            updates, opt_state = self.tx.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state, loss

        param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
        state = (self.adapter_shardings, self.opt_shardings)
        return jax.jit(
            step,
            in_shardings=(*state, param_shardings, self.on_batch, self.on_batch),
            out_shardings=(*state, NamedSharding(self.mesh, P())),
            donate_argnums=(0, 1),
        )

    def train(self, adapters: Any, opt_state: Any, first: int, last: int):
        """Steps ``first .. last - 1``: ``(adapters, opt_state, losses)``."""
        losses = []
        for i in range(first, last):
            adapters, opt_state, loss = self.step(adapters, opt_state, self.params, *self.batch(i))
            losses.append(float(loss))
        return adapters, opt_state, losses


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def compiled_steps(job: Job) -> dict[str, Any]:
    """The LoRA step, the frozen-base floor and a full fine-tune, compiled for the job's shardings.

    The floor runs the forward pass and the backward pass for activations only (the gradient of
    an offset added to the embedded tokens): the least any adapter training must compute. The
    full fine-tune trains every weight with Adam, on the same shardings.
    """
    x, y = _abstract(job.batch(0))
    params = jax.tree.map(_on, job.shardings(job.params), job.params)
    adapters = jax.tree.map(_on, job.adapter_shardings, job.abstract_adapters)
    opt_state = jax.tree.map(_on, job.opt_shardings, jax.eval_shape(job.tx.init, adapters))
    lora = job.step.lower(adapters, opt_state, params, x, y).compile()

    def floor(params, x, y, offset):
        def loss(offset):
            def add_offset(next_fun, args, kwargs, context):  # closes over the traced offset
                out = next_fun(*args, **kwargs)
                if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
                    return out + offset
                return out

            with nn.intercept_methods(add_offset):
                return xent(job.model.apply({"params": params}, x), y)

        return jax.value_and_grad(loss)(offset)

    offset = jax.ShapeDtypeStruct((job.batch_size, job.seq, job.model.d_model), jnp.float32,
                                  sharding=job.on_batch)  # fmt: skip

    def full(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: xent(job.model.apply({"params": p}, x), y))(
            params
        )
        updates, opt_state = job.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    full_opt = jax.eval_shape(job.tx.init, job.params)
    full_opt = jax.tree.map(_on, job.shardings(full_opt), full_opt)
    return {
        "floor_offset": offset,
        "lora": lora,
        "floor": jax.jit(floor).lower(params, x, y, offset).compile(),
        "full": jax.jit(full, donate_argnums=(0, 1)).lower(params, full_opt, x, y).compile(),
    }


def per_device_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s arrays on one device: each leaf's shard on its sharding."""
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def memory_table(job: Job, steps: dict[str, Any]) -> str:
    """``memory_analysis()`` of each compiled step per device, beside the arithmetic for its
    arguments (base shard, factors, optimizer state, batch), as a markdown table."""
    x, y = job.batch(0)
    adapters = jax.tree.map(_on, job.adapter_shardings, job.abstract_adapters)
    opt = jax.tree.map(_on, job.opt_shardings, jax.eval_shape(job.tx.init, adapters))
    base, factors = per_device_bytes(job.params), per_device_bytes(adapters)
    data = per_device_bytes((x, y))
    predicted = {
        "lora": base + factors + per_device_bytes(opt) + data,
        "floor": base + data + per_device_bytes(steps["floor_offset"]),
        "full": 3 * base + data + 4,  # weights, two Adam moments, the step count
    }
    return memory_rows(predicted, steps)


def memory_rows(predicted: dict[str, int], steps: dict[str, Any]) -> str:
    """The markdown table of :func:`memory_table`: per step, the arithmetic for its arguments
    (``predicted``) beside ``memory_analysis()`` of the compiled step (``steps``)."""
    rows = ["| step | arguments (arithmetic) | arguments (compiler) | temporaries | outputs |",
            "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name in ("floor", "lora", "full"):
        m = steps[name].memory_analysis()
        rows.append(f"| {name} | {predicted[name]:,} | {m.argument_size_in_bytes:,} | "
                    f"{m.temp_size_in_bytes:,} | {m.output_size_in_bytes:,} |")  # fmt: skip
    return "\n".join(rows)


def build(mesh: Mesh, *, model: Decoder | None = None, rank: int = 4, batch_size: int = 8,
          seq: int = 16, lr: float = 3e-2) -> Job:  # fmt: skip
    """The base created sharded by the rules, and the adapted model with its factor shardings."""
    model = model or Decoder()
    tokens = jnp.zeros((batch_size, seq), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    params = jax.jit(lambda k: model.init(k, tokens)["params"], out_shardings=shardings)(
        jax.random.key(0)
    )
    adapted = jlora.linen.lora(model, jlora.LoraConfig(targets="all-linear", rank=rank))
    abstract_adapters = jax.eval_shape(adapted.init_adapters, jax.random.key(1), params, tokens)
    specs = nn.get_partition_spec(abstract_adapters)
    adapter_shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
    check_factor_shardings(abstract_adapters, adapter_shardings, mesh)
    return Job(model, mesh, adapted, params, abstract_adapters, adapter_shardings,
               optax.adam(lr), batch_size, seq)  # fmt: skip


def save(job: Job, root: pathlib.Path, step: int, adapters: Any, opt_state: Any) -> None:
    """One ``CheckpointManager`` step holding the adapter checkpoint and the optimizer state."""
    args = jlora.checkpoint.save_args(adapters, job.adapted.config, base=job.params)
    with ocp.CheckpointManager(root) as manager:
        manager.save(
            step, args=ocp.args.Composite(**args, opt_state=ocp.args.StandardSave(opt_state))
        )
        manager.wait_until_finished()


def _on(sharding: Any, x: Any) -> Any:
    """``x``'s shape and dtype on ``sharding``, in ``x``'s metadata box if it has one."""
    if isinstance(x, nn.meta.AxisMetadata):
        return x.replace_boxed(_on(sharding, x.unbox(apply_constraint=False)))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def restore(job: Job, root: pathlib.Path) -> tuple[int, Any, Any]:
    """The latest step's ``(step, adapters, opt_state)``, each array on its sharding."""
    step = max(jlora.checkpoint.steps(root))
    adapters, config = jlora.checkpoint.restore(
        root, step=step, target=job.abstract_adapters, shardings=job.adapter_shardings,
        base=job.params,
    )  # fmt: skip
    assert config == job.adapted.config
    abstract = jax.tree.map(
        _on, job.opt_shardings, jax.eval_shape(job.tx.init, job.abstract_adapters)
    )
    with ocp.CheckpointManager(root) as manager:
        restored = manager.restore(
            step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(abstract))
        )
    return step, adapters, restored["opt_state"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    job = build(mesh)
    names = job.abstract_adapters["layers"]["up"]["kernel"]
    up = job.adapter_shardings["layers"]["up"]["kernel"]
    print(f"mesh {dict(mesh.shape)}; layers/up/kernel {job.params['layers']['up']['kernel'].names}"
          f" -> a {names.a.names} {up.a.spec}, b {names.b.names} {up.b.spec}")  # fmt: skip

    adapters, opt_state = job.start(jax.random.key(1))
    half = args.steps // 2
    adapters, opt_state, first = job.train(adapters, opt_state, 0, half)
    root = (args.workdir or pathlib.Path(tempfile.mkdtemp())) / "checkpoints"
    save(job, root, half, adapters, opt_state)
    full, _, second = job.train(adapters, opt_state, half, args.steps)
    print("loss " + " ".join(f"{v:.3f}" for v in first + second))

    step, adapters, opt_state = restore(job, root)
    resumed, _, again = job.train(adapters, opt_state, step, args.steps)
    same = all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True)
    )
    kept = all(
        x.sharding == s
        for x, s in zip(
            jax.tree.leaves(resumed), jax.tree.leaves(job.adapter_shardings), strict=True
        )
    )
    print(f"resumed at step {step} from {root}: losses equal {again == second}, adapters equal "
          f"bit for bit {same}, on their shardings {kept}")  # fmt: skip
    print("per device, bytes (compiled.memory_analysis() on this mesh):")
    print(memory_table(job, compiled_steps(job)))
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
