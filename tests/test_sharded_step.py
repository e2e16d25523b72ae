"""A LoRA train step on a 2-D (data x model) mesh of 8 devices, against one device and the base.

The scanned decoder of ``models_linen`` with Megatron-sharded weights (``sharded_decoder``):
adapters come from ``jlora.sharding.init``, the step is ``jlora.linen`` apply + optax Adam under
``jax.jit``. The sharded step must equal the single-device step, and its compiled program must
add to the frozen-base step's collectives only rank-sized ones: no weight is gathered and no
weight gradient is reduced.
"""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
import sharded_decoder as sd
from hlo_collectives import Array, arrays, collectives, table, weight_shapes
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import EPS32, assert_same_adam_trajectory

import jlora
import jlora.checkpoint
from jlora import sharding as lsh

STEPS = 3


@dataclasses.dataclass
class Setup:
    mesh: Mesh
    params: dict  # NumPy
    shardings: dict
    sharded_params: dict
    adapters: dict  # sharded, from jlora.sharding.init
    batch: tuple  # NumPy (x, y)
    sharded_batch: tuple
    tx: optax.GradientTransformation
    step: object  # jitted

    @functools.cached_property
    def compiled_lora(self):
        """The sharded LoRA step, compiled for the sharded arguments."""
        with jax.numpy_dtype_promotion("standard"):
            opt_state = self.tx.init(self.adapters)
        args = (self.adapters, opt_state, self.sharded_params, *self.sharded_batch)
        return self.step.lower(*args).compile()

    def compiled_floor(self):
        """The frozen-base step (forward, backward for activations only), compiled."""
        offset = np.zeros((sd.BATCH, sd.SEQ, sd.MODEL.d_model), np.float32)
        offset = jax.device_put(offset, NamedSharding(self.mesh, P("data")))
        return (
            jax.jit(sd.floor_step).lower(self.sharded_params, *self.sharded_batch, offset).compile()
        )


@functools.cache
def _setup() -> Setup:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    params = sd.params()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), sd.specs(params))
    sharded_params = jax.device_put(params, shardings)
    adapters = lsh.init(jax.random.key(1), sharded_params, sd.CONFIG)
    x, y = sd.batch()
    on_data = NamedSharding(mesh, P("data", None))
    sharded_batch = (jax.device_put(x, on_data), jax.device_put(y, on_data))
    tx = optax.adam(sd.LR)
    return Setup(
        mesh, params, shardings, sharded_params, adapters, (x, y), sharded_batch, tx,
        jax.jit(sd.lora_step(tx)),
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup() -> Setup:
    return _setup()


def _train(step, tx, adapters, params, x, y):
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(adapters)
    losses = []
    for _ in range(STEPS):
        adapters, opt_state, loss = step(adapters, opt_state, params, x, y)
        losses.append(float(loss))
    return adapters, np.array(losses)


def test_the_layouts_are_the_models(setup):
    inferred = sd.ADAPTED.infer_layouts(setup.params, setup.batch[0])
    assert {p: s for p, s in inferred.items() if p in sd.LAYOUTS} == sd.LAYOUTS


def test_adapters_are_created_on_their_factor_shardings(setup):
    want = lsh.factor_shardings(setup.adapters, setup.shardings)
    for x, s in zip(jax.tree.leaves(setup.adapters), jax.tree.leaves(want), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    layers = setup.adapters["layers"]
    q, out, up = (
        layers["attn"]["query"]["kernel"],
        layers["attn"]["out"]["kernel"],
        layers["up"]["kernel"],
    )
    # Column-parallel: b split like the weight's fan-out (heads); row-parallel: a like its fan-in.
    assert q.b.addressable_shards[0].data.shape == (3, sd.RANK, 1, 6)
    assert out.a.addressable_shards[0].data.shape == (3, 1, 6, sd.RANK)
    assert up.a.addressable_shards[0].data.shape == (3, 16, sd.RANK)  # replicated
    # Exact, as design.md promises: sharded init is the same jitted init with out_shardings.
    for x, y in zip(
        jax.tree.leaves(setup.adapters),
        jax.tree.leaves(jlora.init(jax.random.key(1), setup.params, sd.CONFIG)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)


def test_sharded_step_matches_one_device(setup):
    sharded, sharded_losses = _train(
        setup.compiled_lora, setup.tx, setup.adapters, setup.sharded_params, *setup.sharded_batch
    )
    single, single_losses = _train(
        setup.step, setup.tx, jax.device_get(setup.adapters), setup.params, *setup.batch
    )
    # Two programs (sharded sums, collectives) agree to round-off, not bit for bit. The loss is
    # a mean of BATCH * SEQ positive cross entropies; a bug moves it by about the training's own
    # change (> 10% here), a thousand times the tolerance.
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=sd.BATCH * sd.SEQ * EPS32)
    assert sharded_losses[-1] < 0.9 * sharded_losses[0]  # training, not standing still
    for got, want, start in zip(
        jax.tree.leaves(sharded),
        jax.tree.leaves(single),
        jax.tree.leaves(setup.adapters),
        strict=True,
    ):
        assert got.sharding.is_equivalent_to(start.sharding, got.ndim)  # factors stay put
        assert len(got.devices()) == 8
        assert_same_adam_trajectory(got, want, start, lr=sd.LR, steps=STEPS)


def test_sharded_checkpoint_restores_onto_another_layout(setup, tmp_path):
    path = jlora.checkpoint.save(tmp_path / "adapter", setup.adapters, sd.CONFIG)
    # Megatron-sharded when saved; restored onto the FSDP x TP layout.
    fsdp = jax.tree.map(lambda s: NamedSharding(setup.mesh, s), sd.specs(setup.params, fsdp="data"))
    target = lsh.factor_shardings(setup.adapters, fsdp)
    restored, config = jlora.checkpoint.restore(path, shardings=target, base=setup.params)
    assert config == sd.CONFIG
    for got, want, s in zip(
        jax.tree.leaves(restored),
        jax.tree.leaves(setup.adapters),
        jax.tree.leaves(target),
        strict=True,
    ):
        assert got.sharding == s
        np.testing.assert_array_equal(got, want)  # exact: a checkpoint round trip moves data
    q = restored["layers"]["attn"]["query"]["kernel"]
    assert q.a.addressable_shards[0].data.shape == (3, 16 // 2, sd.RANK)


def _weight_shapes(setup: Setup) -> set[tuple[int, ...]]:
    """Every base weight's shape: global, one layer of the stack, and one device's shard of each."""
    shardings = dict(jlora._paths.leaves_with_paths(setup.shardings))
    return weight_shapes(
        (path, w.shape, shardings[path])
        for path, w in jlora._paths.leaves_with_paths(setup.params)
        if path.endswith(("kernel", "embedding"))
    )


def test_lora_adds_only_rank_sized_collectives(setup):
    lora = collectives(setup.compiled_lora.as_text())
    floor = collectives(setup.compiled_floor().as_text())
    report = f"LoRA step {table(lora)}; frozen-base step {table(floor)}"

    # Neither step gathers a weight or reduces a weight gradient: no collective reads or writes an
    # array of a weight's shape (global, per layer, or per device).
    weights = _weight_shapes(setup)
    for c in lora + floor:
        for a in c.results + c.operands:
            assert a.shape not in weights, f"{c.kind} {c.name} moves {a}; {report}"
    # LoRA may gather a factor, never anything larger than the base step gathers or a factor.
    largest_factor = max(x.nbytes for x in jax.tree.leaves(setup.adapters))
    largest_floor_gather = max((c.bytes for c in floor if c.kind == "all-gather"), default=0)
    for c in lora:
        if c.kind == "all-gather":
            assert c.bytes <= max(largest_factor, largest_floor_gather), f"{c.name}; {report}"
    # Flattened over XLA's combined tuples, LoRA keeps every base collective and adds only arrays
    # with a rank axis: the (x a) partial sums of row-parallel layers and the factor gradients.
    assert not arrays(floor) - arrays(lora), report
    extra = arrays(lora) - arrays(floor)
    assert extra, report
    assert all(sd.RANK in a.shape for _, a in extra), f"{sorted(extra, key=str)}; {report}"


def test_the_weight_shape_check_catches_full_fine_tuning(setup):
    # The gradient of every weight, reduced over the data axis: the communication LoRA avoids.
    def full_grads(params, x, y):
        return jax.grad(lambda p: sd.xent(sd.MODEL.apply({"params": p}, x), y))(params)

    compiled = jax.jit(full_grads).lower(setup.sharded_params, *setup.sharded_batch).compile()
    moved = {a.shape for c in collectives(compiled.as_text()) for a in c.results}
    assert len(moved & _weight_shapes(setup)) >= 4  # q/k/v, out, up, down shards at least


def test_collective_parser_reads_sync_async_and_tuple_forms():
    hlo = """HloModule m, entry_computation_layout={(f32[8,4]{1,0})->f32[]}

%body.1 (p: (s32[], f32[4,2])) -> (s32[], f32[4,2]) {
  %p = (s32[], f32[4,2]{1,0}) parameter(0)
  %x = f32[4,2]{1,0} get-tuple-element(%p), index=1
  %ar = (f32[4,2]{1,0}, /*index=1*/bf16[3]{0}, f32[]) all-reduce(%x, %y, %z), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
}

ENTRY %main (w: f32[8,4]) -> f32[] {
  %w = f32[8,4]{1,0} parameter(0), sharding={devices=[2,1]<=[2]}
  %ags = (f32[8,4]{1,0}, f32[16,4]{1,0}) all-gather-start(%w), dimensions={0}
  %agd = f32[16,4]{1,0} all-gather-done(%ags)
  ROOT %cp = f32[16,4]{1,0} collective-permute(%agd), source_target_pairs={{0,1},{1,0}}
}
"""
    found = collectives(hlo)
    assert [(c.kind, c.name, c.computation) for c in found] == [
        ("all-reduce", "ar", "body.1"),
        ("all-gather", "agd", "main"),
        ("collective-permute", "cp", "main"),
    ]
    assert found[0].results == (Array("f32", (4, 2)), Array("bf16", (3,)), Array("f32", ()))
    assert found[0].bytes == 4 * 8 + 2 * 3 + 4
    assert found[1].operands == (Array("f32", (8, 4)),)  # the -start's operand
    assert found[2].operands == (Array("f32", (16, 4)),)
    assert table(found) == {
        "all-gather": (1, 1, 256),
        "all-reduce": (1, 3, 42),
        "collective-permute": (1, 1, 256),
    }
