"""The TPU-style job of examples/sharded_job.py on the 2 x 4 fake mesh: Linen logical partitioning,
FSDP x TP, a jitted sharded LoRA step, a checkpointed and resumed run, its communication and memory.

Sizes differ from the example's and are pairwise distinct (batch 6 and sequence 10 differ from every
weight dimension), so a weight-shaped array in the compiled program cannot be an activation.
"""

import collections
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from hlo_collectives import collectives, table, weight_shapes, weight_sized
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jlora
import jlora.checkpoint

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import sharded_job as sj  # noqa: E402

MODEL = sj.Decoder(vocab=40, d_model=24, heads=4, head_dim=6, d_ff=56, layers=2)
RANK = 3


@functools.cache
def _job() -> sj.Job:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    return sj.build(mesh, model=MODEL, rank=RANK, batch_size=6, seq=10)


@functools.cache
def _compiled() -> dict:
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam under the strict test config
        return sj.compiled_steps(_job())


def test_factors_take_derived_logical_names_and_the_users_rules():
    job = _job()
    names = job.abstract_adapters["layers"]["out"]["kernel"]
    assert job.params["layers"]["out"]["kernel"].names == ("layers", "heads", "kv", "embed")
    assert names.a.names == ("layers", "heads", "kv", jlora.sharding.RANK_AXIS)
    assert names.b.names == ("layers", jlora.sharding.RANK_AXIS, "embed")
    out = job.adapter_shardings["layers"]["out"]["kernel"]
    assert (out.a.spec, out.b.spec) == (P(None, "model", None, None), P(None, None, "data"))
    up = job.adapter_shardings["layers"]["up"]["kernel"]
    assert (up.a.spec, up.b.spec) == (P(None, "data", None), P(None, None, "model"))


@pytest.mark.slow  # ~9 s; the NNX twin (tests/test_sharded_job_nnx.py) checks the same in the fast set
def test_resumed_training_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    job = _job()
    with jax.numpy_dtype_promotion("standard"):
        adapters, opt_state = job.start(jax.random.key(1))
        adapters, opt_state, first = job.train(adapters, opt_state, 0, 2)
        sj.save(job, tmp_path, 2, adapters, opt_state)
        saved = [(np.asarray(x), x.sharding) for x in jax.tree.leaves(adapters)]
        structures = jax.tree.structure(adapters), jax.tree.structure(opt_state)
        full, _, second = job.train(adapters, opt_state, 2, 4)
        step, restored, restored_opt = sj.restore(job, tmp_path)
        # The restored state is the saved one, boxed as saved and on the same shardings.
        for got, (want, sharding) in zip(jax.tree.leaves(restored), saved, strict=True):
            assert got.sharding == sharding and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        assert (jax.tree.structure(restored), jax.tree.structure(restored_opt)) == structures
        resumed, _, again = job.train(restored, restored_opt, step, 4)
    assert step == 2 and again == second
    assert second[-1] < first[0]  # it trains
    # The same compiled program on the same data and shardings: equal bit for bit.
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.sharding == want.sharding
    # One orbax step holds the adapter checkpoint (jlora's record) and the optimizer state.
    assert sorted(p.name for p in (tmp_path / "2").iterdir() if p.is_dir()) == [
        "adapters",
        "jlora",
        "opt_state",
    ]


def _weight_sized(found) -> collections.Counter:
    kernels = jlora._paths.leaves_with_paths(_job().params)
    weights = [(p, w.shape, w.sharding) for p, w in kernels if p.endswith(("kernel", "embedding"))]
    return weight_sized(found, weight_shapes(weights))


@pytest.mark.slow  # ~4 s; the NNX twin (tests/test_sharded_job_nnx.py) checks the same in the fast set
def test_the_lora_step_moves_no_weight_beyond_what_the_frozen_step_moves():
    steps = _compiled()
    lora, floor = collectives(steps["lora"].as_text()), collectives(steps["floor"].as_text())
    report = f"LoRA {table(lora)}, floor {table(floor)}"
    # FSDP gathers each layer's weight shards in the forward pass of both steps; LoRA adds no
    # other weight-shaped collective (no weight gradient is reduced, nothing more is gathered).
    extra = _weight_sized(lora) - _weight_sized(floor)
    assert not extra, f"{extra}; {report}"
    # The control: a full fine-tune reduces weight-shaped gradients, and the check sees them.
    full = collectives(steps["full"].as_text())
    assert _weight_sized(full) - _weight_sized(floor), table(full)


def test_memory_analysis_matches_the_arithmetic_per_device():
    job, steps = _job(), _compiled()
    rows = sj.memory_table(job, steps).splitlines()[2:]
    values = {
        r.split("|")[1].strip(): [int(v.replace(",", "")) for v in r.split("|")[2:-1]] for r in rows
    }
    for name, (predicted, compiled, _, _) in values.items():
        assert predicted == compiled, (name, values)  # arguments: shard bytes, exactly


@pytest.mark.parametrize("rank_rule", ["model", "data"])
def test_a_rule_that_shards_the_rank_is_refused(rank_rule):
    job = _job()
    rules = tuple(r for r in sj.RULES if r[0] != jlora.sharding.RANK_AXIS)
    rules += ((jlora.sharding.RANK_AXIS, rank_rule),)
    specs = nn.get_partition_spec(job.abstract_adapters)
    shardings = nn.logical_to_mesh_sharding(specs, job.mesh, rules)
    with pytest.raises(jlora.AdapterMismatchError, match=r"layers/.*/kernel.*rank"):
        jlora.sharding.check_factor_shardings(job.abstract_adapters, shardings, job.mesh)


@pytest.mark.slow
def test_the_example_runs_end_to_end(monkeypatch, capsys, tmp_path):
    example = EXAMPLES / "sharded_job.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--workdir", str(tmp_path)])
    with jax.numpy_dtype_promotion("standard"):
        sj.main()
    out = capsys.readouterr().out
    assert "losses equal True, adapters equal bit for bit True, on their shardings True" in out
    losses = [float(v) for v in out.split("\nloss ")[1].split("\n")[0].split()]
    assert np.mean(losses[-5:]) < 0.8 * losses[0]
    rows = [r.split("|") for r in out.splitlines() if r.startswith(("| floor", "| lora", "| full"))]
    assert len(rows) == 3 and all(r[2] == r[3] for r in rows)  # arithmetic == compiler


def test_restore_onto_a_boxed_base_boxes_the_factors_as_init_does(tmp_path):
    job = _job()
    with jax.numpy_dtype_promotion("standard"):
        adapters, _ = job.start(jax.random.key(2))
    path = jlora.checkpoint.save(tmp_path / "adapter", adapters, job.adapted.config)
    restored, _ = jlora.checkpoint.restore(path, base=job.params)
    assert nn.get_partition_spec(restored) == nn.get_partition_spec(adapters)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(got, want)
    plain, _ = jlora.checkpoint.restore(path)  # no target, no base: plain arrays
    assert jax.tree.structure(plain) == jax.tree.structure(nn.unbox(adapters))


def test_the_floor_differentiates_through_every_layer():
    # The floor is the backward pass for activations: its gradient must not be an exact zero.
    job = _job()
    x, y = job.batch(0)
    offset = jax.device_put(np.zeros((6, 10, MODEL.d_model), np.float32), job.on_batch)
    loss, grad = _compiled()["floor"](job.params, x, y, offset)
    assert np.isfinite(float(loss)) and float(np.abs(np.asarray(grad)).sum()) > 0
