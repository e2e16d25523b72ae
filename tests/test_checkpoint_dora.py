"""DoRA magnitudes in adapter checkpoints: saved beside the factors (format version 3), restored
bit for bit with magnitudes=True, refused without it, and on b's mesh under a mesh."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jlora
from jlora import AdapterMismatchError, checkpoint
from jlora._errors import DamagedCheckpointError
from jlora.variants import dora_magnitudes, dora_merge

CONFIG = jlora.LoraConfig(targets=("w", "s"), rank=2, layouts={"s": "sio"})


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
        "s": jnp.asarray(rng.standard_normal((3, 8, 4)), jnp.float32),
    }
    adapters = jlora.init(jax.random.key(seed), params, CONFIG)
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # b != 0: the magnitudes are not ||W0||
    return params, adapters, dora_magnitudes(params, adapters)


def test_magnitudes_round_trip_bit_for_bit_and_merge_equal(tmp_path):
    params, adapters, ms = _tree()
    assert ms["w"].shape == (6,) and ms["s"].shape == (3, 4)
    path = checkpoint.save(tmp_path / "ckpt", adapters, CONFIG, magnitudes=ms)
    record = json.loads((path / "jlora" / "metadata").read_text())
    assert record["version"] == 3
    assert record["magnitudes"] == {
        "w": {"shape": [6], "dtype": "float32"},
        "s": {"shape": [3, 4], "dtype": "float32"},
    }
    got, config, got_ms = checkpoint.restore(path, magnitudes=True)
    assert config == CONFIG and set(got_ms) == {"w", "s"}
    for p in ("w", "s"):
        np.testing.assert_array_equal(got_ms[p], ms[p])
        np.testing.assert_array_equal(got[p].a, adapters[p].a)
    want = dora_merge(params, adapters, ms)
    merged = dora_merge(params, got, got_ms)
    for p in ("w", "s"):
        np.testing.assert_array_equal(merged[p], want[p])


def test_restore_refuses_magnitudes_not_asked_for_and_disk_merge_refuses_them(tmp_path):
    params, adapters, ms = _tree()
    path = checkpoint.save(tmp_path / "ckpt", adapters, CONFIG, magnitudes=ms)
    refused = r"DoRA magnitudes for 2 weights.*magnitudes=True"
    with pytest.raises(AdapterMismatchError, match=refused):
        checkpoint.restore(path)
    with ocp.StandardCheckpointer() as saver:
        saver.save(tmp_path / "base", params)
    with pytest.raises(AdapterMismatchError, match="DoRA magnitudes"):
        checkpoint.merge_checkpoint(tmp_path / "base", path, tmp_path / "out")


def test_checkpoints_without_magnitudes_keep_their_version(tmp_path):
    _, adapters, _ = _tree()
    path = checkpoint.save(tmp_path / "ckpt", adapters, CONFIG)
    assert json.loads((path / "jlora" / "metadata").read_text())["version"] == 1
    got, _, got_ms = checkpoint.restore(path, magnitudes=True)
    assert got_ms == {}
    np.testing.assert_array_equal(got["w"].b, adapters["w"].b)
    got, _ = checkpoint.restore(path)  # the two-tuple as before


def test_save_refuses_magnitudes_that_do_not_fit(tmp_path):
    _, adapters, ms = _tree()
    misfit = r"s: the DoRA magnitude has shape \(4,\).*\(3, 4\)"
    with pytest.raises(AdapterMismatchError, match=misfit):
        checkpoint.save(tmp_path / "a", adapters, CONFIG, magnitudes={**ms, "s": ms["s"][0]})
    with pytest.raises(AdapterMismatchError, match="head: magnitudes hold a DoRA magnitude here"):
        checkpoint.save(tmp_path / "b", adapters, CONFIG, magnitudes={**ms, "head": ms["w"]})
    with pytest.raises(TypeError, match="magnitudes: got"):
        checkpoint.save(tmp_path / "c", adapters, CONFIG, magnitudes=[ms["w"]])
    assert not (tmp_path / "a").exists()


def test_a_tampered_magnitude_is_refused(tmp_path):
    _, adapters, ms = _tree()
    path = checkpoint.save(tmp_path / "ckpt", adapters, CONFIG, magnitudes=ms)
    meta = path / "jlora" / "metadata"
    record = json.loads(meta.read_text())
    record["digests"]["w"]["m"] = "0" * 64
    meta.write_text(json.dumps(record))
    with pytest.raises(DamagedCheckpointError, match="w/m differs from the SHA-256 digest"):
        checkpoint.restore(path, magnitudes=True)
    record["magnitudes"]["w"]["shape"] = [5]
    meta.write_text(json.dumps(record))
    with pytest.raises(DamagedCheckpointError, match="magnitude 'w' has shape"):
        checkpoint.restore(path, magnitudes=True)


def test_magnitudes_restore_onto_b_mesh_less_the_rank_axis(tmp_path):
    _, adapters, ms = _tree()
    path = checkpoint.save(tmp_path / "ckpt", adapters, CONFIG, magnitudes=ms)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    P = jax.sharding.PartitionSpec
    def named(*spec):
        return jax.sharding.NamedSharding(mesh, P(*spec))

    on = {
        "w": {"a": named(), "b": named(None, "x")},
        "s": {"a": named(), "b": named(None, None, "x")},
    }
    _, _, got = checkpoint.restore(path, shardings=on, magnitudes=True)
    assert got["w"].sharding == named("x") and got["s"].sharding == named(None, "x")
    np.testing.assert_array_equal(got["s"], ms["s"])
