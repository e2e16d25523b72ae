"""The TPU fine-tuning job of examples/sharded_job.py in Flax NNX, on 8 fake CPU devices.

The decoder is written the way NNX models are sharded: every weight created with
``nnx.with_partitioning(init, (logical names))``, the blocks stacked by ``nnx.vmap`` and run by
``nnx.scan``, both with ``transform_metadata={nnx.PARTITION_NAME: 'layers'}``, so each stacked
weight carries a ``layers`` name. The same ``logical_axis_rules`` as the Linen job
(``sharded_job.RULES``: FSDP x TP on a ``2 x 4`` ``(data, model)`` mesh) shard the base, and
``jlora.nnx.lora`` gives each :class:`jlora.nnx.LoraParam` factor names derived from its
weight's (``a``: stack and fan-in names plus ``lora_rank``; ``b``: ``lora_rank`` plus stack and
fan-out names), which the same rules shard; ``lora_rank`` is replicated.

1. The model is created sharded with Flax's recipe (``nnx.jit`` around the constructor,
   ``nnx.get_partition_spec``, ``with_sharding_constraint``, ``nnx.update``) under
   ``jax.set_mesh`` and ``nnx.logical_axis_rules``; the factors and ``nnx.Optimizer``'s Adam
   moments (which copy the factors' metadata) are created inside it, so no device ever holds a
   whole weight.
2. The step is the functional form Flax recommends for a hot loop: ``nnx.split`` once,
   ``jax.jit`` a function of the states that ``nnx.merge`` s them, here with ``in_shardings`` /
   ``out_shardings`` from ``nnx.get_named_sharding`` and the factor and optimizer states donated.
   It trains the factors only (``nnx.Optimizer(..., wrt=LoraParam)``).
3. Halfway, ``jlora.nnx.to_adapters`` turns the factor state into jlora adapters, and one orbax
   ``CheckpointManager`` step holds the jlora adapter checkpoint (``jlora.checkpoint.save_args``)
   and the optimizer state; both are restored onto the shardings of the abstract state
   (``nnx.eval_shape`` + ``nnx.get_named_sharding``), the adapters back into factor state by
   ``jlora.nnx.to_state``, and the resumed run equals the uninterrupted one bit for bit.
4. ``compiled.memory_analysis()`` of the LoRA step, the frozen-base floor and a full fine-tune,
   per device, beside the arithmetic (``sharded_job.memory_rows``).

Run: ``python examples/sharded_job_nnx.py`` (12 s on 2 idle cores, about 35 s on busy ones).
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
import contextlib
import dataclasses
import functools
import pathlib
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sharded_job import RULES, batch, memory_rows, per_device_bytes, xent  # examples/, on the path

import jlora
import jlora.checkpoint
import jlora.nnx
from jlora.nnx import LoraParam

LAYERS = {nnx.PARTITION_NAME: "layers"}  # the stack axis's logical name, for vmap and scan


def _init(names: tuple[str, ...], init: Any = None) -> Any:
    return nnx.with_partitioning(init or nnx.initializers.normal(0.05), names)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The decoder's dimensions (hashable: a static argument of the jitted constructor)."""

    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    head_dim: int = 8
    d_ff: int = 64
    layers: int = 2


class Block(nnx.Module):
    """A pre-norm decoder block (the Linen job's ``Block``)."""

    def __init__(self, sizes: Sizes, *, rngs: nnx.Rngs):
        d, shape = sizes.d_model, (sizes.heads, sizes.head_dim)
        ones = nnx.initializers.ones
        self.norm1 = nnx.RMSNorm(d, scale_init=_init(("embed",), ones), rngs=rngs)
        self.query, self.key, self.value = (
            nnx.LinearGeneral(
                d, shape, use_bias=False, kernel_init=_init(("embed", "heads", "kv")), rngs=rngs
            )
            for _ in range(3)
        )
        self.out = nnx.LinearGeneral(
            shape,
            d,
            axis=(-2, -1),
            use_bias=False,
            kernel_init=_init(("heads", "kv", "embed")),
            rngs=rngs,
        )
        self.norm2 = nnx.RMSNorm(d, scale_init=_init(("embed",), ones), rngs=rngs)
        self.up = nnx.Linear(
            d, sizes.d_ff, use_bias=False, kernel_init=_init(("embed", "mlp")), rngs=rngs
        )
        self.down = nnx.Linear(
            sizes.d_ff, d, use_bias=False, kernel_init=_init(("mlp", "embed")), rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        t, head_dim = x.shape[-2], self.query.kernel.shape[-1]
        h = self.norm1(x)
        q, k, v = self.query(h), self.key(h), self.value(h)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), v))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Decoder(nnx.Module):
    """Token embedding (tied output head), ``layers`` blocks stacked by ``nnx.vmap`` and run by
    ``nnx.scan``, final norm."""

    def __init__(self, sizes: Sizes, *, rngs: nnx.Rngs):
        embedding_init = _init(("vocab", "embed"), nnx.initializers.normal(0.2))
        self.embed = nnx.Embed(sizes.vocab, sizes.d_model, embedding_init=embedding_init, rngs=rngs)

        @nnx.split_rngs(splits=sizes.layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=LAYERS)
        def stack(rngs: nnx.Rngs) -> Block:
            return Block(sizes, rngs=rngs)

        self.layers = stack(rngs)
        self.norm = nnx.RMSNorm(
            sizes.d_model, scale_init=_init(("embed",), nnx.initializers.ones), rngs=rngs
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.logits(self.embed(tokens))

    def logits(self, h: jax.Array) -> jax.Array:
        """The logits of embedded tokens ``h``: the blocks, the norm, the tied head."""

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=LAYERS)
        def forward(x: jax.Array, block: Block) -> jax.Array:
            return block(x)

        return self.embed.attend(self.norm(forward(h, self.layers)))


@functools.partial(nnx.jit, static_argnames=("sizes", "config", "tx"))
def create(
    key: jax.Array,
    *,
    sizes: Sizes,
    config: jlora.LoraConfig | None,
    tx: optax.GradientTransformation | None,
) -> tuple[Decoder, nnx.Optimizer | None]:
    """The decoder, adapted by ``config`` and with ``tx``'s optimizer on the factors (if given),
    created sharded: Flax's recipe, under ``jax.set_mesh`` and ``nnx.logical_axis_rules``.

    The base is the same for every ``key``, which draws the factors only.
    """
    model = Decoder(sizes, rngs=nnx.Rngs(0))
    optimizer = None
    if config is not None:
        jlora.nnx.lora(model, config, rngs=nnx.Rngs(params=key))
        optimizer = nnx.Optimizer(model, tx, wrt=LoraParam)
    # With eager sharding (Flax's default) every variable is already created on its sharding
    # and this is a no-op; with it off, this is what shards them.
    state = nnx.state((model, optimizer))
    sharded = jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
    nnx.update((model, optimizer), sharded)
    return model, optimizer


def train_step(graphdef: nnx.GraphDef, opt_def: nnx.GraphDef, wrt: Any):
    """``step(trained, opt_state, frozen, x, y) -> (trained, opt_state, loss)``: one Adam step on
    the ``wrt`` variables of the model ``nnx.merge(graphdef, trained, frozen)``."""

    def step(trained, opt_state, frozen, x, y):
        model, optimizer = nnx.merge(graphdef, trained, frozen), nnx.merge(opt_def, opt_state)
        loss, grads = nnx.value_and_grad(
            lambda model: xent(model(x), y), argnums=nnx.DiffState(0, wrt)
        )(model)
        optimizer.update(model, grads)
        return nnx.state(model, wrt), nnx.state(optimizer), loss

    return step


@contextlib.contextmanager
def sharded(mesh: Mesh) -> Iterator[None]:
    """The mesh and the rules, which NNX reads when it creates variables or derives shardings."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        yield


def _abstract(state: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything the job fixes before training: model definition, mesh, shardings, jitted step.

    The frozen base is held as a sharded state; the trainable state (factors, optimizer) is
    passed to and returned by :meth:`train`, since the step donates it.
    """

    sizes: Sizes
    mesh: Mesh
    config: jlora.LoraConfig
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef  # the adapted model's
    opt_def: nnx.GraphDef
    base: nnx.State  # every variable but the factors, sharded
    abstract_factors: nnx.State  # LoraParam state of jax.ShapeDtypeStruct, on their shardings
    abstract_opt: nnx.State
    batch_size: int
    seq: int

    @property
    def on_batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data", None))  # RULES: batch -> data

    def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
        x, y = batch(self.sizes.vocab, self.batch_size, self.seq, step)
        return jax.device_put(x, self.on_batch), jax.device_put(y, self.on_batch)

    def shardings(self, abstract: Any) -> Any:
        return jax.tree.map(lambda x: x.sharding, abstract)

    def start(self, seed: int) -> tuple[nnx.State, nnx.State]:
        """Fresh factors (drawn from ``seed``) and optimizer state, created on their shardings.

        (The base that :func:`create` makes beside them is dropped: the job holds its own.)
        """
        with sharded(self.mesh):
            model, optimizer = create(
                jax.random.key(seed), sizes=self.sizes, config=self.config, tx=self.tx
            )
        return nnx.state(model, LoraParam), nnx.state(optimizer)

    @functools.cached_property
    def step(self):
        """The LoRA step, jitted with its shardings; the factor and optimizer states are donated."""
        state = (self.shardings(self.abstract_factors), self.shardings(self.abstract_opt))
        return jax.jit(
            train_step(self.graphdef, self.opt_def, LoraParam),
            in_shardings=(*state, self.shardings(self.base), self.on_batch, self.on_batch),
            out_shardings=(*state, NamedSharding(self.mesh, P())),
            donate_argnums=(0, 1),
        )

    def train(self, factors: nnx.State, opt_state: nnx.State, first: int, last: int):
        """Steps ``first .. last - 1``: ``(factors, opt_state, losses)``."""
        losses = []
        for i in range(first, last):
            factors, opt_state, loss = self.step(factors, opt_state, self.base, *self.batch(i))
            losses.append(float(loss))
        return factors, opt_state, losses

    def model(self, factors: nnx.State) -> Decoder:
        """The adapted model holding ``factors`` (for evaluation, or ``jlora.nnx.merge``)."""
        return nnx.merge(self.graphdef, factors, self.base)


def build(
    mesh: Mesh,
    *,
    sizes: Sizes | None = None,
    rank: int = 4,
    batch_size: int = 8,
    seq: int = 16,
    lr: float = 3e-2,
) -> Job:
    """The base created sharded by the rules, and the shardings of the factors and optimizer."""
    sizes, tx = sizes or Sizes(), optax.adam(lr)
    config = jlora.LoraConfig(targets="all-linear", rank=rank)
    make = functools.partial(create, sizes=sizes, config=config, tx=tx)
    with sharded(mesh):
        model, optimizer = nnx.eval_shape(make, jax.random.key(1))
        # nnx.eval_shape leaves shardings out of its ShapeDtypeStructs; the metadata and the rules
        # give them.
        graphdef, factors, _ = nnx.split(model, LoraParam, ...)
        opt_def, opt_state = nnx.split(optimizer)
        abstract_factors = _abstract(factors, nnx.get_named_sharding(factors, mesh))
        abstract_opt = _abstract(opt_state, nnx.get_named_sharding(opt_state, mesh))
        base, _ = create(jax.random.key(0), sizes=sizes, config=None, tx=None)
    return Job(
        sizes,
        mesh,
        config,
        tx,
        graphdef,
        opt_def,
        nnx.state(base),
        abstract_factors,
        abstract_opt,
        batch_size,
        seq,
    )


def save(job: Job, root: pathlib.Path, step: int, factors: nnx.State, opt_state: nnx.State) -> None:
    """One ``CheckpointManager`` step: the jlora adapter checkpoint and the optimizer state."""
    adapters = jlora.nnx.to_adapters(factors)
    args = jlora.checkpoint.save_args(adapters, job.config, base=nnx.to_pure_dict(job.base))
    with ocp.CheckpointManager(root) as manager:
        manager.save(
            step, args=ocp.args.Composite(**args, opt_state=ocp.args.StandardSave(opt_state))
        )
        manager.wait_until_finished()


def restore(job: Job, root: pathlib.Path) -> tuple[int, nnx.State, nnx.State]:
    """The latest step's ``(step, factors, opt_state)``, each array on its sharding."""
    step = max(jlora.checkpoint.steps(root))
    adapters, config = jlora.checkpoint.restore(
        root,
        step=step,
        target=jlora.nnx.to_adapters(job.abstract_factors),
        base=nnx.to_pure_dict(job.base),
    )
    assert config == job.config
    with sharded(job.mesh):  # to_state creates the factors as lora does: on their shardings
        factors = jlora.nnx.to_state(job.model(job.abstract_factors), adapters)
    with ocp.CheckpointManager(root) as manager:
        restored = manager.restore(
            step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(job.abstract_opt))
        )
    return step, factors, restored["opt_state"]


def compiled_steps(job: Job) -> dict[str, Any]:
    """The LoRA step, the frozen-base floor and a full fine-tune, compiled for the job's shardings.

    The floor is the forward pass and the backward pass for activations only (the gradient of an
    offset added to the embedded tokens); the full fine-tune trains every weight with Adam.
    """
    x, y = _abstract(job.batch(0), (job.on_batch, job.on_batch))
    base = _abstract(job.base, job.shardings(job.base))
    lora = job.step.lower(job.abstract_factors, job.abstract_opt, base, x, y).compile()

    def plain_and_optimizer() -> tuple[Decoder, nnx.Optimizer]:
        model, _ = create(jax.random.key(0), sizes=job.sizes, config=None, tx=None)
        return model, nnx.Optimizer(model, job.tx, wrt=nnx.Param)

    with sharded(job.mesh):
        plain, optimizer = nnx.eval_shape(plain_and_optimizer)
        plain_def, _, rest = nnx.split(plain, nnx.Param, ...)
        opt_def, opt_state = nnx.split(optimizer)
        opt_state = _abstract(opt_state, nnx.get_named_sharding(opt_state, job.mesh))

    def floor(params, x, y, offset):
        def loss(model, offset):
            return xent(model.logits(model.embed(x) + offset), y)

        return nnx.value_and_grad(loss, argnums=1)(nnx.merge(plain_def, params, rest), offset)

    offset = jax.ShapeDtypeStruct(
        (job.batch_size, job.seq, job.sizes.d_model), jnp.float32, sharding=job.on_batch
    )
    full = jax.jit(train_step(plain_def, opt_def, nnx.Param), donate_argnums=(0, 1))
    return {
        "floor_offset": offset,
        "lora": lora,
        "floor": jax.jit(floor).lower(base, x, y, offset).compile(),
        "full": full.lower(base, opt_state, rest, x, y).compile(),
    }


def argument_bytes(job: Job, steps: dict[str, Any]) -> dict[str, int]:
    """Per device, the bytes of each compiled step's arguments by arithmetic: the shard of each
    array on its sharding (base, factors, optimizer state, batch, the floor's offset)."""
    base, data = per_device_bytes(job.base), per_device_bytes(job.batch(0))
    return {
        "lora": base + per_device_bytes((job.abstract_factors, job.abstract_opt)) + data,
        "floor": base + data + per_device_bytes(steps["floor_offset"]),
        # weights, two Adam moments, Adam's count and nnx.Optimizer's step (int32, uint32)
        "full": 3 * base + data + 4 + 4,
    }


def memory_table(job: Job, steps: dict[str, Any]) -> str:
    """``memory_analysis()`` of each compiled step per device beside :func:`argument_bytes`, as a
    markdown table."""
    return memory_rows(argument_bytes(job, steps), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    job = build(mesh)
    up = job.abstract_factors["layers"]["up"]
    a, b = ((up[f].get_metadata()["out_sharding"], up[f].get_value().sharding.spec) for f in up)
    names = job.base["layers"]["up"]["kernel"].get_metadata()["out_sharding"]
    print(f"mesh {dict(mesh.shape)}; layers/up/kernel {names} -> lora_a {a}, lora_b {b}")

    factors, opt_state = job.start(1)
    half = args.steps // 2
    factors, opt_state, first = job.train(factors, opt_state, 0, half)
    root = (args.workdir or pathlib.Path(tempfile.mkdtemp())) / "checkpoints"
    save(job, root, half, factors, opt_state)
    full, _, second = job.train(factors, opt_state, half, args.steps)
    print("loss " + " ".join(f"{v:.3f}" for v in first + second))

    step, factors, opt_state = restore(job, root)
    resumed, _, again = job.train(factors, opt_state, step, args.steps)
    pairs = list(zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True))
    same = all(np.array_equal(x, y) for x, y in pairs)
    shardings = jax.tree.leaves(job.shardings(job.abstract_factors))
    kept = all(x.sharding == s for x, s in zip(jax.tree.leaves(resumed), shardings, strict=True))
    print(
        f"resumed at step {step} from {root}: losses equal {again == second}, factors equal "
        f"bit for bit {same}, on their shardings {kept}"
    )
    print("per device, bytes (compiled.memory_analysis() on this mesh):")
    print(memory_table(job, compiled_steps(job)))
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
