import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint.experimental import v1 as ocp_v1
from trees import random_factors, transformer_params

import jlora
import jlora.sharding
from jlora import AdapterMismatchError, LoraConfig, checkpoint
from jlora.__main__ import main
from jlora.checkpoint import _disk_merge as ckpt_merge
from jlora.checkpoint._restore import _single_device_sharding

CONFIG = LoraConfig(
    targets=(r".*/(query|value|up)/kernel", r"embed/embedding", r"stacked"),
    rank=3,
    alpha=6,
    rank_pattern={r".*up/kernel": 2},
    layouts={"stacked": "sio"},
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed=0):
    params = transformer_params(seed)
    params["stacked"] = np.random.default_rng(seed).normal(size=(3, 8, 16)).astype(np.float32)
    params["step"] = 7
    return params


def _adapters(params, seed=1, config=CONFIG):
    # Shapes from jax.eval_shape (no compilation), values from NumPy: trained-looking factors.
    shapes = jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, config))
    return random_factors(shapes, seed=seed)


def _table(adapters):
    return jlora._merge.factors_by_path(adapters)


def _assert_same_adapters(got, expected):
    got_t, exp_t = _table(got), _table(expected)
    assert list(got_t) == list(exp_t)
    for path, f in exp_t.items():
        g = got_t[path]
        assert (g.scale, g.layout) == (f.scale, f.layout), path
        np.testing.assert_array_equal(g.a, f.a)  # exact: a round trip only moves data
        np.testing.assert_array_equal(g.b, f.b)
        assert g.a.dtype == f.a.dtype and g.b.dtype == f.b.dtype


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


# --- adapter checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact_and_restores_the_config(tmp_path, dtype):
    params = _params()
    config = LoraConfig(**{**CONFIG.to_dict(), "dtype": dtype})
    adapters = _adapters(params, config=config)
    path = checkpoint.save(tmp_path / "ckpt", adapters, config, base=params)
    restored, restored_config = checkpoint.restore(path, base=params)
    assert restored_config == config
    assert jax.tree.structure(restored) == jax.tree.structure(adapters)
    _assert_same_adapters(restored, adapters)
    # The stored record: layouts, shapes and the fingerprint (weights only, not the step scalar).
    record = json.loads((path / "jlora" / "metadata").read_text())
    assert record["adapters"]["stacked"]["layout"] == {
        "fan_in_ndim": 1,
        "fan_out_ndim": 1,
        "embedding": False,
    }
    assert record["adapters"]["stacked"]["a"] == {"shape": [3, 8, 3], "dtype": dtype}
    assert ["stacked", [3, 8, 16], "float32"] in record["base"]
    assert all(entry[0] != "step" for entry in record["base"])


def test_restore_into_an_abstract_target_casts_to_its_dtypes(tmp_path):
    params = _params()
    adapters = _adapters(params)
    checkpoint.save(tmp_path / "ckpt", adapters, CONFIG)
    bf16 = LoraConfig(**{**CONFIG.to_dict(), "dtype": "bfloat16"})
    target = jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, bf16))
    restored, _ = checkpoint.restore(tmp_path / "ckpt", target=target)
    f = restored["layers_1"]["attn"]["value"]["kernel"]
    expected = adapters["layers_1"]["attn"]["value"]["kernel"]
    assert f.a.dtype == jnp.bfloat16
    # Exact: a float32 -> bfloat16 cast is correctly rounded, whoever performs it.
    np.testing.assert_array_equal(_bits(f.a), _bits(jnp.asarray(expected.a, jnp.bfloat16)))


def test_restore_onto_named_shardings(tmp_path):
    params = _params()
    adapters = _adapters(params)
    checkpoint.save(tmp_path / "ckpt", adapters, CONFIG)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    spec = jax.sharding.PartitionSpec

    def named(*axes):
        return jax.sharding.NamedSharding(mesh, spec(*axes))

    # a: fan-in axis sharded over x; b: fan-out axis over x; the rank axis replicated.
    shardings = {
        path: {"a": named(*([None] * (f.a.ndim - 2)), "x", None), "b": named(None, "x")}
        for path, f in _table(adapters).items()
        if f.a.ndim == 2 and not f.layout.embedding
    }
    shardings["embed/embedding"] = named()
    shardings["stacked"] = {"a": named(None, "y", None), "b": named(None, None, "y")}
    restored, _ = checkpoint.restore(tmp_path / "ckpt", shardings=jlora._paths.nest(shardings))
    f = restored["layers_0"]["attn"]["query"]["kernel"]
    assert f.a.sharding == named("x", None) and f.b.sharding == named(None, "x")
    assert len(f.a.sharding.device_set) == 8
    assert restored["stacked"].b.sharding == named(None, None, "y")
    _assert_same_adapters(restored, adapters)
    # The shardings jlora.sharding derives from the base weights' specs fit restore as they are.
    specs = jax.tree.map(lambda _: spec(None, "x"), params)
    specs["stacked"], specs["embed"]["embedding"] = spec(None, None, "y"), spec()
    from_base = jlora.sharding.factor_shardings(adapters, specs, mesh)
    restored, _ = checkpoint.restore(tmp_path / "ckpt", shardings=from_base)
    f = restored["layers_1"]["mlp"]["up"]["kernel"]
    assert f.a.sharding == named(None, None) and f.b.sharding == named(None, "x")
    assert restored["stacked"].b.sharding == named(None, None, "y")
    # Shardings can also come with the target (jax.eval_shape style, plus a sharding).
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=named()), adapters
    )
    restored, _ = checkpoint.restore(tmp_path / "ckpt", target=target)
    assert restored["embed"]["embedding"].b.sharding == named()


def test_restore_onto_another_base_names_the_first_differing_path(tmp_path):
    params = _params()
    adapters = _adapters(params)
    checkpoint.save(tmp_path / "ckpt", adapters, CONFIG, base=params)
    other = transformer_params(d_ff=64)
    other["stacked"] = params["stacked"]
    with pytest.raises(
        AdapterMismatchError,
        match=r"^layers_0/mlp/down/kernel: the base given has shape \(64, 16\) float32 but the "
        r"adapters were saved for a base with shape \(32, 16\) float32 \(6 differing paths\)",
    ):
        checkpoint.restore(tmp_path / "ckpt", base=other)
    missing = dict(params)
    del missing["stacked"]
    with pytest.raises(AdapterMismatchError, match=r"^stacked: the base given has no such leaf"):
        checkpoint.restore(tmp_path / "ckpt", base=missing)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if np.ndim(x) else x, params)
    with pytest.raises(AdapterMismatchError, match=r"shape \(11, 16\) bfloat16 but the adapters"):
        checkpoint.restore(tmp_path / "ckpt", base=half)


def test_without_a_fingerprint_restore_still_checks_the_fit(tmp_path):
    params = _params()
    checkpoint.save(tmp_path / "ckpt", _adapters(params), CONFIG)
    other = dict(params, stacked=np.zeros((3, 8, 12), np.float32))
    with pytest.raises(AdapterMismatchError, match=r"^stacked: adapter factors a \(3, 8, 3\)"):
        checkpoint.restore(tmp_path / "ckpt", base=other)
    with pytest.raises(AdapterMismatchError, match=r"^stacked: the adapters have factors at this"):
        checkpoint.restore(
            tmp_path / "ckpt", base={k: v for k, v in params.items() if k != "stacked"}
        )


def test_save_rejects_bad_input_without_writing(tmp_path):
    params = _params()
    adapters = _adapters(params)
    target = tmp_path / "ckpt"
    other_scale = LoraConfig(**{**CONFIG.to_dict(), "alpha": 12})
    cases = [
        (TypeError, r"config: got a dict; expected the jlora.LoraConfig", (adapters, {})),
        (
            AdapterMismatchError,
            r"^embed/embedding: the adapter has scale 2.0 but the config gives scale 4.0",
            (adapters, other_scale),
        ),
        (
            AdapterMismatchError,
            r"^embed/embedding: the adapter has scale 2.0 but the config does not target",
            (adapters, LoraConfig(**{**CONFIG.to_dict(), "exclude": ["embed/.*"]})),
        ),
        (AdapterMismatchError, r"holds no LoraFactors", ({}, CONFIG)),
        (AdapterMismatchError, r"^w: adapter tree holds a ndarray", ({"w": np.ones(2)}, CONFIG)),
    ]
    for error, match, (tree, config) in cases:
        with pytest.raises(error, match=match):
            checkpoint.save(target, tree, config)
    with pytest.raises(AdapterMismatchError, match=r"^stacked: adapter factors .* do not fit"):
        checkpoint.save(target, adapters, CONFIG, base=dict(params, stacked=np.ones((3, 8, 8))))
    for step in (-1, True, "3"):
        with pytest.raises(ValueError, match=r"step: .* is invalid; expected an integer >= 0"):
            checkpoint.save(target, adapters, CONFIG, step=step)
    assert not target.exists()
    checkpoint.save(target, adapters, CONFIG)
    before = sorted(p.name for p in target.rglob("*"))
    with pytest.raises(FileExistsError, match=r"ckpt: already exists; .* never overwrites"):
        checkpoint.save(target, _adapters(params, seed=5), CONFIG)
    assert sorted(p.name for p in target.rglob("*")) == before
    _assert_same_adapters(checkpoint.restore(target)[0], adapters)


def test_restore_rejects_mismatched_targets_and_shardings(tmp_path):
    params = _params()
    adapters = _adapters(params)
    checkpoint.save(tmp_path / "ckpt", adapters, CONFIG)
    rank4 = LoraConfig(**{**CONFIG.to_dict(), "rank": 4})
    target = jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, rank4))
    with pytest.raises(
        AdapterMismatchError, match=r"^embed/embedding: the target has a \(11, 4\), b \(4, 16\)"
    ):
        checkpoint.restore(tmp_path / "ckpt", target=target)
    fewer = LoraConfig(**{**CONFIG.to_dict(), "exclude": ["stacked"]})
    target = jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, fewer))
    with pytest.raises(AdapterMismatchError, match=r"^stacked: an adapter at this path is in the"):
        checkpoint.restore(tmp_path / "ckpt", target=target)
    device = _single_device_sharding(jax.devices()[1])
    with pytest.raises(AdapterMismatchError, match=r"^embed/embedding: shardings has no entry"):
        checkpoint.restore(tmp_path / "ckpt", shardings={"stacked": device})
    every = {p: device for p in _table(adapters)} | {"extra/kernel": device}
    with pytest.raises(AdapterMismatchError, match=r"^extra/kernel: shardings has an entry here"):
        checkpoint.restore(tmp_path / "ckpt", shardings=jlora._paths.nest(every))
    with pytest.raises(TypeError, match=r"shardings at stacked: got a str; expected a jax"):
        checkpoint.restore(tmp_path / "ckpt", shardings={"stacked": "x"})


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no adapter checkpoint here, and no step"):
        checkpoint.restore(tmp_path)
    params = _params()
    checkpoint.save(tmp_path, _adapters(params), CONFIG, step=4)
    with pytest.raises(
        FileNotFoundError, match=r"no adapter checkpoint for step 5; steps .*: \[4\]"
    ):
        checkpoint.restore(tmp_path, step=5)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            tmp_path / "foreign",
            args=ocp.args.Composite(
                adapters=ocp.args.StandardSave({"x": np.ones(2)}),
                jlora=ocp.args.JsonSave({"format": "something else"}),
            ),
        )
    with pytest.raises(ValueError, match=r"foreign: not a jlora adapter checkpoint"):
        checkpoint.restore(tmp_path / "foreign")


def test_steps_and_latest(tmp_path):
    params = _params()
    saved = {step: _adapters(params, seed=step) for step in (1, 5, 3)}
    for step, adapters in saved.items():
        assert checkpoint.save(tmp_path, adapters, CONFIG, step=step) == tmp_path / str(step)
    (tmp_path / "9").mkdir()  # not a checkpoint
    assert checkpoint.steps(tmp_path) == [1, 3, 5]
    _assert_same_adapters(checkpoint.restore(tmp_path)[0], saved[5])
    _assert_same_adapters(checkpoint.restore(tmp_path, step=3)[0], saved[3])


def test_checkpoint_manager_keeps_the_last_n(tmp_path):
    params = _params()
    saved = {}
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path, options=options) as manager:
        for step in range(4):
            saved[step] = _adapters(params, seed=10 + step)
            manager.save(step, args=checkpoint.save_args(saved[step], CONFIG, base=params))
        manager.wait_until_finished()
    assert checkpoint.steps(tmp_path) == [2, 3]
    restored, config = checkpoint.restore(tmp_path, base=params)
    assert config == CONFIG
    _assert_same_adapters(restored, saved[3])
    _assert_same_adapters(checkpoint.restore(tmp_path, step=2)[0], saved[2])


def _raise(*args, **kwargs):
    raise RuntimeError("interrupted")


async def _raise_async(*args, **kwargs):
    raise RuntimeError("interrupted")


@pytest.mark.parametrize(
    "failing",
    [
        # while the items are written: the JSON record fails next to the arrays
        (ocp.JsonCheckpointHandler, "async_save", _raise_async),
        # everything written, before orbax commits (renames) the checkpoint
        (ocp.CompositeCheckpointHandler, "finalize", _raise),
    ],
)
def test_a_save_interrupted_half_way_leaves_the_previous_one(tmp_path, monkeypatch, failing):
    params = _params()
    first, second = _adapters(params, seed=1), _adapters(params, seed=2)
    checkpoint.save(tmp_path, first, CONFIG, step=1)
    with monkeypatch.context() as patch:
        patch.setattr(*failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            checkpoint.save(tmp_path, second, CONFIG, step=2)
    assert checkpoint.steps(tmp_path) == [1]
    # Nothing is left: the failed save waited for orbax's writers and removed its scratch.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    _assert_same_adapters(checkpoint.restore(tmp_path)[0], first)
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint for step 2"):
        checkpoint.restore(tmp_path, step=2)
    checkpoint.save(tmp_path, second, CONFIG, step=2)  # the same step again, at once
    _assert_same_adapters(checkpoint.restore(tmp_path)[0], second)


def test_a_killed_save_leaves_the_previous_one(tmp_path):
    params = _params()
    first = _adapters(params, seed=1)
    checkpoint.save(tmp_path, first, CONFIG, step=1)
    # A child process that dies (os._exit: no cleanup, no finally) once every file of step 2 is
    # written but before orbax commits it: the worst moment for a kill.
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import jax, orbax.checkpoint as ocp
        from test_checkpoint import CONFIG, _adapters, _params
        from jlora import checkpoint
        ocp.CompositeCheckpointHandler.finalize = lambda *a, **k: os._exit(17)
        checkpoint.save({str(tmp_path)!r}, _adapters(_params(), seed=2), CONFIG, step=2)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 17
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".2.jlora-save-")]
    assert len(leftovers) == 1  # the half-written one, in the dead save's scratch directory
    assert checkpoint.steps(tmp_path) == [1]
    _assert_same_adapters(checkpoint.restore(tmp_path)[0], first)
    checkpoint.save(tmp_path, first, CONFIG, step=3)  # the next save removes the dead one's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "3"]


# --- merging on disk -------------------------------------------------------------------------


def _save_base(path, params):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)


def _load_merged(path):
    return ocp_v1.load(path)


def _mixed_params():
    params = _params()
    params["layers_1"] = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params["layers_1"])
    return params


def test_merge_checkpoint_names_a_missing_or_file_base(tmp_path):
    params = _params()
    checkpoint.save(tmp_path / "adapter", _adapters(params), CONFIG)
    (tmp_path / "afile").write_text("not a checkpoint")
    for base, what in [("missing", "no such directory"), ("afile", "is a file")]:
        with pytest.raises(FileNotFoundError, match=rf"base {tmp_path / base}: {what}; expected"):
            checkpoint.merge_checkpoint(tmp_path / base, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_checkpoint_equals_the_in_memory_merge_bit_for_bit(tmp_path):
    params = _mixed_params()
    adapters = _adapters(params)
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapter", adapters, CONFIG, base=params)
    summary = checkpoint.merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", group_bytes=4096
    )
    expected = jlora.merge(params, adapters)
    got = _load_merged(tmp_path / "out")
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    # Exact, as documented: merge_checkpoint calls jlora.merge leaf by leaf, the same eager ops
    # on the same shapes on one device; the other leaves are copied.
    for path, leaf in jlora._paths.leaves_with_paths(expected):
        value = dict(jlora._paths.leaves_with_paths(got))[path]
        if np.ndim(leaf) == 0:
            assert value == leaf
            continue
        assert value.dtype == leaf.dtype, path
        np.testing.assert_array_equal(_bits(value), _bits(leaf), err_msg=path)
    n_adapted = len(_table(adapters))
    n_leaves = len(jax.tree.leaves(params))
    assert (summary.merged, summary.copied) == (n_adapted, n_leaves - n_adapted)
    assert summary.nbytes == sum(x.nbytes for x in jax.tree.leaves(params) if np.ndim(x))
    largest = max(x.nbytes for x in jax.tree.leaves(params) if np.ndim(x))
    assert 0 < summary.peak_group_bytes <= 4096 + largest
    assert str(summary).startswith(
        f"merged {n_adapted} adapted leaves and copied {n_leaves - n_adapted} others ("
    )
    # The merged checkpoint reads with the loaders users call (orbax v0 and v1) directly, and is
    # itself a base for another merge.
    with ocp.StandardCheckpointer() as ckptr:
        v0 = ckptr.restore(tmp_path / "out")
    np.testing.assert_array_equal(v0["stacked"], expected["stacked"])  # exact: data read back
    checkpoint.save(tmp_path / "adapter2", adapters, CONFIG)
    checkpoint.merge_checkpoint(tmp_path / "out", tmp_path / "adapter2", tmp_path / "twice")
    twice = _load_merged(tmp_path / "twice")
    np.testing.assert_array_equal(twice["stacked"], jlora.merge(expected, adapters)["stacked"])


@pytest.mark.parametrize("without_option", [False, True])  # True: orbax 0.12.0's capability
def test_merge_writes_under_the_users_orbax_context_and_leaves_it_unchanged(
    tmp_path, monkeypatch, without_option
):
    # The group writes skip orbax's copy of each NumPy array on jlora's own copy of the active
    # context: the user's options are inherited (a timeout here) and never changed; an orbax
    # without `deepcopy_host_arrays` keeps copying. Either way the output is merge's, bit for bit.
    from jlora.checkpoint import _leaf_io

    skip = _leaf_io._can_skip_host_copy(ocp_v1.Context().memory) and not without_option
    if without_option:
        monkeypatch.setattr(_leaf_io, "_can_skip_host_copy", lambda memory: False)
    real, seen = _leaf_io._partial_api(), []

    class Recording:
        finalize = staticmethod(real.finalize)

        @staticmethod
        def save(target, tree):
            active = _leaf_io._active_context()
            copies = getattr(active.memory, "deepcopy_host_arrays", True)
            seen.append((copies, active.asynchronous.timeout_secs))
            real.save(target, tree)

    monkeypatch.setattr(_leaf_io, "_partial_api", lambda: Recording)
    params = _mixed_params()
    adapters = _adapters(params)
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapter", adapters, CONFIG)
    user = ocp_v1.Context()
    user.asynchronous.timeout_secs = 77
    memory, options = user.memory, dataclasses.asdict(user.memory)
    with user:
        checkpoint.merge_checkpoint(
            tmp_path / "base", tmp_path / "adapter", tmp_path / "out", group_bytes=4096
        )
    assert len(seen) > 1 and set(seen) == {(not skip, 77)}
    assert user.memory is memory and dataclasses.asdict(user.memory) == options
    expected = dict(jlora._paths.leaves_with_paths(jlora.merge(params, adapters)))
    for path, value in jlora._paths.leaves_with_paths(_load_merged(tmp_path / "out")):
        if np.ndim(value):
            np.testing.assert_array_equal(_bits(value), _bits(expected[path]), err_msg=path)
        else:
            assert value == expected[path], path


def test_merge_holds_a_bounded_number_of_bytes_at_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    leaf = 64 * 1024  # bytes per leaf (128 x 128 float32)
    params = {
        f"block_{i}": {"kernel": rng.normal(size=(128, 128)).astype(np.float32)} for i in range(48)
    }
    total = 48 * leaf
    config = LoraConfig(targets=r"block_(1|2)?[05]/kernel", rank=4)
    adapters = _adapters(params, config=config)
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapter", adapters, config)

    # Every array the merge reads or writes is tracked until it is freed (weakref finalizers), so
    # `peak` is the most bytes of leaves the merge held at any moment, whatever it does inside.
    live, seen, peak = {}, set(), [0]

    def track(values):
        for v in values.values():
            if isinstance(v, np.ndarray) and id(v) not in live:
                live[id(v)] = v.nbytes
                weakref.finalize(v, live.pop, id(v))
        peak[0] = max(peak[0], sum(live.values()))
        seen.update(values)

    read, write = ckpt_merge._read_group, ckpt_merge._write_group

    def tracked_read(*args):
        values = read(*args)
        track(values)
        return values

    def tracked_write(target, values):
        track(values)
        return write(target, values)

    monkeypatch.setattr(ckpt_merge, "_read_group", tracked_read)
    monkeypatch.setattr(ckpt_merge, "_write_group", tracked_write)
    group = 4 * leaf
    summary = checkpoint.merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", group_bytes=group
    )
    assert len(seen) == 48 and summary.merged == 6
    assert summary.peak_group_bytes == group
    # A group of base leaves plus the merged copies of the adapted ones: far below the model.
    assert peak[0] <= 2 * group <= total / 6
    assert not live  # nothing kept after the merge
    got = _load_merged(tmp_path / "out")
    expected = jlora.merge(params, adapters)
    for name in ("block_0", "block_25", "block_47"):  # exact: the same merge code, see above
        np.testing.assert_array_equal(got[name]["kernel"], expected[name]["kernel"])


def test_merge_refuses_to_write_over_its_inputs(tmp_path):
    params = _params()
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapter", _adapters(params), CONFIG, base=params)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for out, name in [
        (base, "base"),
        (adapter, "adapter"),
        (base / "sub", "base"),
        (tmp_path, "base"),
        (str(adapter) + "/", "adapter"),
    ]:
        with pytest.raises(ValueError, match=rf"would overwrite the {name} checkpoint"):
            checkpoint.merge_checkpoint(base, adapter, out, overwrite=True)
    with pytest.raises(ValueError, match=r"is a jlora adapter checkpoint; expected the base"):
        checkpoint.merge_checkpoint(adapter, adapter / "x", tmp_path / "out")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_merge_replaces_an_existing_output_only_when_asked_and_complete(tmp_path, monkeypatch):
    params = _params()
    adapters = _adapters(params)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    _save_base(base, params)
    checkpoint.save(adapter, adapters, CONFIG, base=params)
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"out .* already exists; pass overwrite=True"):
        checkpoint.merge_checkpoint(base, adapter, out)

    calls = [0]
    write = ckpt_merge._write_group

    def failing_write(target, values):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("disk full")
        return write(target, values)

    with pytest.raises(FileExistsError, match=r"out .* is a directory holding \['keep.txt'\]"):
        checkpoint.merge_checkpoint(base, adapter, out, overwrite=True)  # not a checkpoint
    with monkeypatch.context() as patch:
        patch.setattr(ckpt_merge, "_write_group", failing_write)
        with pytest.raises(OSError, match="disk full"):
            checkpoint.merge_checkpoint(
                base, adapter, out, overwrite=True, force=True, group_bytes=1024
            )
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]  # no scratch

    checkpoint.merge_checkpoint(base, adapter, out, overwrite=True, force=True)
    assert not (out / "keep.txt").exists()
    expected = jlora.merge(params, adapters)
    np.testing.assert_array_equal(_load_merged(out)["stacked"], expected["stacked"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


def test_merge_refuses_adapters_saved_for_another_base(tmp_path):
    params = _params()
    _save_base(tmp_path / "base", params)
    other = dict(params, stacked=np.zeros((3, 8, 20), np.float32))
    checkpoint.save(tmp_path / "adapter", _adapters(other), CONFIG, base=other)
    with pytest.raises(
        AdapterMismatchError, match=r"^stacked: the base given has shape \(3, 8, 16\) float32"
    ):
        checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_command_line_merge(tmp_path, capsys):
    params = _params()
    adapters = _adapters(params)
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapters", adapters, CONFIG, step=3)
    argv = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapters")]
    argv += ["--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("merged 8 adapted leaves and copied 23 others (")
    assert (
        f"load it with orbax.checkpoint.StandardCheckpointer().restore('{tmp_path / 'out'}')" in out
    )
    expected = jlora.merge(params, adapters)
    with ocp.StandardCheckpointer() as ckptr:  # what the command line says to run
        loaded = ckptr.restore(tmp_path / "out")
    np.testing.assert_array_equal(loaded["stacked"], expected["stacked"])  # exact: data read back
    assert main(argv) == 1
    assert "jlora merge: error: out " in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--base", "x"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_command_line_merge_resident_memory_stays_far_below_the_model(tmp_path):
    # 64 leaves of 8 MiB (512 MiB). A fresh process runs the command line and reports how far its
    # peak resident size rose during the merge, allocator, orbax and XLA buffers included.
    rng = np.random.default_rng(0)
    params = {
        f"block_{i}": {"kernel": rng.normal(size=(1024, 2048)).astype(np.float32)}
        for i in range(64)
    }
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    config = LoraConfig(targets=r"block_\d*[02468]/kernel", rank=8)
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapter", _adapters(params, config=config), config)
    del params
    argv = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    argv += ["--out", str(tmp_path / "out"), "--group-mib", "8", "--quiet"]
    script = textwrap.dedent(f"""
        import resource
        import jax.numpy as jnp
        from jlora.__main__ import main
        jnp.ones(3).block_until_ready()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert main({argv!r}) == 0
        print("growth", 1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    growth = int(done.stdout.split("growth")[-1])
    assert growth < total / 4, (growth, total)
    help_text = subprocess.run(
        [sys.executable, "-m", "jlora", "merge", "--help"], env=env, cwd=ROOT, capture_output=True
    )
    assert b"--overwrite" in help_text.stdout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_disk_merge_kernel_is_bit_equal_to_jlora_merge(dtype):
    # The on-disk merge forms the delta with merge's own code and adds and rounds in one jitted
    # pass; canonical, transposed and stacked layouts, with and without the finite check.
    from jlora._merge import adapter_tables
    from jlora.checkpoint._leaf_merge import merge_leaf

    rng = np.random.default_rng(7)
    for shape, layout in [((257, 77), "io"), ((64, 48), "oi"), ((4, 16, 24), "sio")]:
        w = np.asarray(jnp.asarray(rng.standard_normal(shape, np.float32), dtype))
        config = LoraConfig(targets="w", rank=8, alpha=16.0, layouts={"w": layout})
        adapters = jlora.init(jax.random.key(1), {"w": w}, config)
        adapters = jax.tree.map(
            lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype) * 0.3, adapters
        )
        want = np.asarray(jlora.merge({"w": jnp.asarray(w)}, adapters)["w"])
        factors = adapter_tables(adapters)[0]["w"]
        for check in (True, False):
            got = np.asarray(merge_leaf("w", w, factors, check_finite=check))
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("chunk", [7, 2**22])  # the scan for NaN/Inf: many chunks, or one
def test_disk_merge_kernel_counts_new_overflow_and_ignores_the_bases_own_nan(
    dtype, chunk, monkeypatch
):
    from jlora._errors import NonFiniteError
    from jlora.checkpoint import _leaf_merge
    from jlora.checkpoint._leaf_merge import merge_leaf

    monkeypatch.setattr(_leaf_merge, "_CHUNK", chunk)
    w = np.zeros((40, 10), jnp.dtype(dtype))
    assert not _leaf_merge._any_nonfinite(w)
    edge = np.full(9, jnp.finfo(dtype).max, w.dtype)  # the largest finite values, both signs
    edge[1] = -edge[1]
    assert not _leaf_merge._any_nonfinite(edge)
    for bad in (-np.inf, np.inf, -np.nan):
        edge[8] = bad
        assert _leaf_merge._any_nonfinite(edge)
    a = np.zeros((40, 1), np.float32)
    a[37, 0] = 1e30  # 1e40 overflows each dtype (float32 too) only in row 37
    factors = jlora.LoraFactors(a, np.full((1, 10), 1e10, np.float32), 1.0, jlora.Layout(1, 1))
    with pytest.raises(NonFiniteError, match=r"w: merging gives 10 NaN or infinite values"):
        merge_leaf("w", w, factors, check_finite=True)
    w[37] = np.nan  # NaN already in the base: nothing new, so nothing is refused
    out = np.asarray(merge_leaf("w", w, factors, check_finite=True))
    assert np.isnan(out[37].astype(np.float32)).all()
    assert not np.isnan(out[:37].astype(np.float32)).any()


def test_restore_names_a_record_that_disagrees_with_the_arrays(tmp_path):
    # The arrays of a rank-4 save under the record of a rank-2 one: the record is compared with
    # orbax's metadata before any array is read, and the first differing key is named.
    import shutil

    from jlora._errors import DamagedCheckpointError

    params = {"w": jnp.ones((8, 6))}
    saved = {}
    for rank in (2, 4):
        config = LoraConfig(targets="w", rank=rank)
        adapters = jlora.init(jax.random.key(rank), params, config)
        saved[rank] = checkpoint.save(tmp_path / f"r{rank}", adapters, config)
    shutil.rmtree(tmp_path / "r2" / "adapters")
    shutil.copytree(tmp_path / "r4" / "adapters", tmp_path / "r2" / "adapters")
    with pytest.raises(
        DamagedCheckpointError,
        match=r"its record \(jlora/metadata\) gives w/a shape \(8, 2\) float32 but its arrays "
        r"hold shape \(8, 4\) float32; the record and the arrays come from different saves",
    ):
        checkpoint.restore(tmp_path / "r2")
