"""The job of examples/sharded_job_nnx.py, Flax NNX's twin of tests/test_sharded_job.py, on the
2 x 4 fake mesh: NNX sharding metadata and logical rules, FSDP x TP, a jitted sharded LoRA step, a
checkpointed and resumed run, its communication and memory.

Sizes are the Linen test's, pairwise distinct (batch 6 and sequence 10 differ from every weight
dimension), so a weight-shaped array in the compiled program cannot be an activation.
"""

import collections
import functools
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from hlo_collectives import collectives, table, weight_shapes, weight_sized
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jlora
import jlora._paths
from jlora.sharding import RANK_AXIS

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import sharded_job_nnx as sjn  # noqa: E402

SIZES = sjn.Sizes(vocab=40, d_model=24, heads=4, head_dim=6, d_ff=56, layers=2)
RANK = 3


@functools.cache
def _job() -> sjn.Job:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam under the strict test config
        return sjn.build(mesh, sizes=SIZES, rank=RANK, batch_size=6, seq=10)


@functools.cache
def _compiled() -> dict:
    with jax.numpy_dtype_promotion("standard"):
        return sjn.compiled_steps(_job())


def _names(var: nnx.Variable) -> tuple:
    return tuple(var.get_metadata()["out_sharding"])


def _spec(x: jax.Array) -> P:
    """The array's PartitionSpec padded to its rank (jit may drop trailing Nones)."""
    spec = tuple(x.sharding.spec)
    return P(*spec, *(None,) * (x.ndim - len(spec)))


def test_factors_take_derived_logical_names_and_are_created_on_the_rules_shardings():
    job = _job()
    assert _names(job.base["layers"]["out"]["kernel"]) == ("layers", "heads", "kv", "embed")
    out = job.abstract_factors["layers"]["out"]
    assert _names(out["lora_a"]) == ("layers", "heads", "kv", RANK_AXIS)
    assert _names(out["lora_b"]) == ("layers", RANK_AXIS, "embed")
    want = {
        ("out", "lora_a"): P(None, "model", None, None),
        ("out", "lora_b"): P(None, None, "data"),
        ("up", "lora_a"): P(None, "data", None),
        ("up", "lora_b"): P(None, None, "model"),
        ("query", "lora_b"): P(None, None, "model", None),
    }
    with jax.numpy_dtype_promotion("standard"):
        factors, opt_state = job.start(2)
    for (layer, name), spec in want.items():
        assert job.abstract_factors["layers"][layer][name].get_value().sharding.spec == spec
        assert _spec(factors["layers"][layer][name].get_value()) == spec, (layer, name)
        # nnx.Optimizer's Adam moments copy the factors' metadata, so the rules shard them alike.
        mu = opt_state["opt_state"][0]["mu"]["layers"][layer][name].get_value()
        assert _spec(mu) == spec, (layer, name)
    assert _spec(job.base["layers"]["up"]["kernel"].get_value()) == P(None, "data", "model")


def test_resumed_training_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    job = _job()
    with jax.numpy_dtype_promotion("standard"):
        factors, opt_state = job.start(1)
        factors, opt_state, first = job.train(factors, opt_state, 0, 2)
        sjn.save(job, tmp_path, 2, factors, opt_state)
        saved = [(np.asarray(x), x.sharding) for x in jax.tree.leaves((factors, opt_state))]
        structures = jax.tree.structure(factors), jax.tree.structure(opt_state)
        full, _, second = job.train(factors, opt_state, 2, 4)
        step, restored, restored_opt = sjn.restore(job, tmp_path)
        # The restored state is the saved one, with its metadata and on the same shardings.
        got = jax.tree.leaves((restored, restored_opt))
        for x, (want, sharding) in zip(got, saved, strict=True):
            assert x.sharding == sharding and x.dtype == want.dtype
            np.testing.assert_array_equal(x, want)
        assert (jax.tree.structure(restored), jax.tree.structure(restored_opt)) == structures
        resumed, _, again = job.train(restored, restored_opt, step, 4)
    assert step == 2 and again == second
    assert second[-1] < first[0]  # it trains
    # The same compiled program on the same data and shardings: equal bit for bit.
    for x, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(x, want)
        assert x.sharding == want.sharding
    # One orbax step holds a jlora adapter checkpoint and the optimizer state; the adapter
    # checkpoint alone restores as any other (functional adapters at the weights' paths).
    assert sorted(p.name for p in (tmp_path / "2").iterdir() if p.is_dir()) == [
        "adapters",
        "jlora",
        "opt_state",
    ]
    adapters, config = jlora.checkpoint.restore(tmp_path)
    assert config == job.config
    assert sorted(adapters["layers"]) == ["down", "key", "out", "query", "up", "value"]


def _weight_sized(found) -> collections.Counter:
    base = jlora._paths.leaves_with_paths(nnx.to_pure_dict(_job().base))
    weights = [(p, w.shape, w.sharding) for p, w in base if p.endswith(("kernel", "embedding"))]
    return weight_sized(found, weight_shapes(weights))


def test_the_lora_step_moves_no_weight_beyond_what_the_frozen_step_moves():
    job, steps = _job(), _compiled()
    # The floor is a backward pass through every layer, not the forward alone.
    offset = jax.device_put(np.zeros(steps["floor_offset"].shape, np.float32), job.on_batch)
    assert np.abs(np.asarray(steps["floor"](job.base, *job.batch(0), offset)[1])).max() > 0
    lora, floor = collectives(steps["lora"].as_text()), collectives(steps["floor"].as_text())
    report = f"LoRA {table(lora)}, floor {table(floor)}"
    # Both gather FSDP weight shards (the floor in its backward pass too); LoRA adds no other
    # weight-shaped collective: no weight gradient is reduced, nothing more is gathered.
    extra = _weight_sized(lora) - _weight_sized(floor)
    assert not extra, f"{extra}; {report}"
    # The control: a full fine-tune reduces weight-shaped gradients, and the check sees them.
    full = collectives(steps["full"].as_text())
    assert _weight_sized(full) - _weight_sized(floor), table(full)


def test_memory_analysis_matches_the_arithmetic_per_device():
    job, steps = _job(), _compiled()
    predicted = sjn.argument_bytes(job, steps)
    assert set(predicted) == {"floor", "lora", "full"}
    for name, size in predicted.items():  # arguments: shard bytes, exactly
        assert steps[name].memory_analysis().argument_size_in_bytes == size, name


@pytest.mark.slow
def test_the_example_runs_end_to_end(monkeypatch, capsys, tmp_path):
    example = EXAMPLES / "sharded_job_nnx.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--workdir", str(tmp_path)])
    with jax.numpy_dtype_promotion("standard"):
        sjn.main()
    out = capsys.readouterr().out
    assert "losses equal True, factors equal bit for bit True, on their shardings True" in out
    losses = [float(v) for v in out.split("\nloss ")[1].split("\n")[0].split()]
    assert np.mean(losses[-5:]) < 0.8 * losses[0]
    rows = [r.split("|") for r in out.splitlines() if r.startswith(("| floor", "| lora", "| full"))]
    assert len(rows) == 3 and all(r[2] == r[3] for r in rows)  # arithmetic == compiler
