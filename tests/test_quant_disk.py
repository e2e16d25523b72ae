"""jlora.quant.merge_checkpoint: the on-disk merge onto a quantised base equals the in-memory one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.checkpoint
import jlora.quant as jq
from jlora._errors import NonFiniteError

ocp = pytest.importorskip("orbax.checkpoint")


def _setup(tmp_path, kind="nf4", seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "dense": {
            "kernel": jax.random.normal(k[0], (64, 64)) * 0.1,
            "bias": jax.random.normal(k[1], (64,)),
        },
        # One shape for both kernels: each eager op compiles once (the test stays fast).
        "out": {"kernel": jax.random.normal(k[2], (64, 64)) * 0.1},
    }
    config = jlora.LoraConfig(targets=".*kernel", rank=4)
    adapters = jlora.init(k[3], params, config)
    # b = 0 after init: give the factors values so the merge changes every weight.
    adapters = jax.tree.map(lambda x: jax.random.normal(k[3], x.shape, x.dtype) * 0.05, adapters)
    q = jq.quantize(params, config, kind=kind)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "base", q)
    jlora.checkpoint.save(tmp_path / "adapter", adapters, config)
    return q, adapters


def _restore(path, like):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, jax.tree.map(np.zeros_like, like))


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_equals_in_memory_merge_bit_for_bit(tmp_path, kind):
    q, adapters = _setup(tmp_path, kind)
    like = jax.eval_shape(lambda: q)
    summary = jq.merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", like=like, group_bytes=1
    )
    assert (summary.merged, summary.copied) == (2, 1)
    want = jq.merge(q, adapters, dtype=jnp.bfloat16)
    _assert_same(_restore(tmp_path / "out", want), want)


@pytest.mark.parametrize(
    "kind",
    ["int8", pytest.param("nf4", marks=pytest.mark.slow)],  # 4-bit re-quantising: ~3 s
)
def test_requantize_matches_in_memory_tree_and_report(tmp_path, kind):
    q, adapters = _setup(tmp_path, kind, seed=1)
    summary, report = jq.merge_checkpoint(
        tmp_path / "base",
        tmp_path / "adapter",
        tmp_path / "out",
        like=q,
        dtype=jnp.float32,
        requantize=True,
    )
    want, want_report = jq.merge(q, adapters, dtype=jnp.float32, requantize=True)
    assert report == want_report and set(report) == {"dense/kernel", "out/kernel"}
    # A quantised checkpoint round trip: the output restores into the quantised structure.
    got = _restore(summary.out, want)
    _assert_same(got, want)
    assert isinstance(got["dense"]["kernel"], jq.QuantizedWeight)


def test_refuses_aliasing_existing_output_and_mismatched_like(tmp_path):
    q, _ = _setup(tmp_path, "nf4", seed=2)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    with pytest.raises(ValueError, match="out"):
        jq.merge_checkpoint(base, adapter, base, like=q)
    with pytest.raises(ValueError, match="out"):
        jq.merge_checkpoint(base, adapter, base / "inner", like=q)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        jq.merge_checkpoint(base, adapter, out, like=q)
    with pytest.raises(FileExistsError, match="not an orbax PyTree checkpoint"):
        jq.merge_checkpoint(base, adapter, out, like=q, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    int4 = jq.quantize(jq.dequantize(q), ".*kernel", kind="int4", double_quant=False)
    with pytest.raises(
        jlora.AdapterMismatchError,
        match=r"dense/kernel/scales: the base checkpoint .* has shape \(64, 1\) and dtype int8 but like "
        r"expects shape \(64, 1\) and dtype float32",
    ):
        jq.merge_checkpoint(base, adapter, tmp_path / "o2", like=int4)
    assert not (tmp_path / "o2").exists()


def test_overwrite_replaces_a_checkpoint_atomically(tmp_path):
    q, adapters = _setup(tmp_path, "nf4", seed=3)
    out = tmp_path / "out"
    jq.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", out, like=q, dtype=jnp.float32)
    jq.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", out, like=q, overwrite=True)
    want = jq.merge(q, adapters)
    _assert_same(_restore(out, want), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


def test_overflowing_merge_is_refused_before_anything_is_written(tmp_path):
    q, adapters = _setup(tmp_path, "int8", seed=4)
    huge = jax.tree.map(lambda x: x * 1e20, adapters)  # finite factors, a @ b overflows float32
    jlora.checkpoint.save(tmp_path / "huge", huge, jlora.LoraConfig(targets=".*kernel", rank=4))
    with pytest.raises(NonFiniteError, match=r"dense/kernel: merging gives \d+ NaN"):
        jq.merge_checkpoint(tmp_path / "base", tmp_path / "huge", tmp_path / "out", like=q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "huge"]


@pytest.mark.parametrize(
    ("kind", "double_quant", "dtype"),
    [("nf4", True, jnp.bfloat16), ("int4", False, jnp.float32), ("int8", False, jnp.float32)],
)
def test_save_restore_round_trip_is_bit_exact_and_needs_no_like(tmp_path, kind, double_quant,
                                                                 dtype):  # fmt: skip
    rng = np.random.default_rng(5)
    params = {
        "layers": {"kernel": jnp.asarray(rng.standard_normal((3, 64, 128)) * 0.1, dtype)},
        "head": {"kernel": jnp.asarray(rng.standard_normal((64, 64)), dtype),
                 "bias": jnp.asarray(rng.standard_normal(64), dtype)},
    }  # fmt: skip
    config = jlora.LoraConfig(targets=".*kernel", rank=2, layouts={"layers/kernel": "sio"})
    q = jq.quantize(params, config, kind=kind, double_quant=double_quant)
    out = jq.save(tmp_path / "q", q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no scratch left behind
    for like in (None, q, jax.eval_shape(lambda: q)):
        got = jq.restore(out, like=like)
        _assert_same(got, q)  # same tree, metadata (static: in the treedef), dtypes and bits
    assert got["layers"]["kernel"].stack_ndim == (1 if double_quant else 0)
    with pytest.raises(FileExistsError, match=r"already exists; jlora.quant.save never replaces"):
        jq.save(out, q)


def test_merge_checkpoint_reads_the_stored_metadata(tmp_path):
    q, adapters = _setup(tmp_path, "nf4", seed=6)
    jq.save(tmp_path / "saved", q)
    summary, report = jq.merge_checkpoint(
        tmp_path / "saved", tmp_path / "adapter", tmp_path / "out", requantize=True
    )
    want, want_report = jq.merge(q, adapters, dtype=jnp.bfloat16, requantize=True)
    assert report == want_report
    _assert_same(jq.restore(summary.out), want)  # the re-quantised output has its metadata too
    with pytest.raises(FileNotFoundError, match=r"no jlora_quant.json, so the quantisation"):
        jq.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "o2")


def test_mismatched_metadata_is_refused_with_the_path(tmp_path):
    q, _ = _setup(tmp_path, "nf4", seed=7)
    saved = jq.save(tmp_path / "saved", q)
    int4 = jq.quantize(jq.dequantize(q), ".*kernel", kind="int4")
    adapter, out = tmp_path / "adapter", tmp_path / "o"
    for call in (lambda: jq.restore(saved, like=int4),
                 lambda: jq.merge_checkpoint(saved, adapter, out, like=int4)):  # fmt: skip
        with pytest.raises(
            jlora.AdapterMismatchError,
            match=r"dense/kernel: the checkpoint .* stores kind='nf4' but like has kind='int4'",
        ):
            call()
    plain = {"dense": {"kernel": jq.dequantize(q["dense"]["kernel"]), "bias": q["dense"]["bias"]},
             "out": q["out"]}  # fmt: skip
    with pytest.raises(
        jlora.AdapterMismatchError,
        match=r"dense/kernel: the checkpoint holds a quantised weight here but like does not",
    ):
        jq.restore(saved, like=plain)
    # A metadata file that does not belong to the arrays (edited: another block size).
    meta = saved / "jlora_quant.json"
    meta.write_text(meta.read_text().replace('"block_size": 64', '"block_size": 32'))
    with pytest.raises(
        jlora.AdapterMismatchError,
        match=r"dense/kernel/scales: the checkpoint .* has shape \(64, 1\) and dtype int8 but its "
        r"metadata \(jlora_quant.json: nf4, shape \(64, 64\), block size 32",
    ):
        jq.restore(saved)
    with pytest.raises(FileNotFoundError, match=r"no jlora_quant.json; this checkpoint was not"):
        jq.restore(tmp_path / "base")


def test_adapters_saved_for_another_quantisation_are_refused(tmp_path):
    q, adapters = _setup(tmp_path, "nf4", seed=8)
    config = jlora.LoraConfig(targets=".*kernel", rank=4)
    # Saved with base=q: the record holds a digest of each dequantised weight.
    jlora.checkpoint.save(tmp_path / "trained", adapters, config, base=q)
    jq.save(tmp_path / "nf4", q)
    jq.merge_checkpoint(tmp_path / "nf4", tmp_path / "trained", tmp_path / "ok")  # its own base
    int4 = jq.quantize(jq.dequantize(q), ".*kernel", kind="int4")
    jq.save(tmp_path / "int4", int4)
    with pytest.raises(
        jlora.AdapterMismatchError,
        match=r"dense/kernel: the base's dequantised int4 weight \(block size 64, "
        r"double_quant=True\) differs from the one the adapters were saved for",
    ):
        jq.merge_checkpoint(tmp_path / "int4", tmp_path / "trained", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    jq.merge_checkpoint(tmp_path / "int4", tmp_path / "trained", tmp_path / "out",
                        base_digest=False)  # fmt: skip
