"""Bad input, damaged files and non-finite values: a clear error (or the right result), never a
silently wrong model. One test per class of input from issue 12."""

import dataclasses
import gc
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from test_checkpoint import CONFIG, _adapters, _params, _save_base
from trees import transformer_params

import jlora
import jlora.nnx
from jlora import AdapterMismatchError, ConfigError, LoraConfig, TargetError, checkpoint, ops
from jlora import peft as jpeft
from jlora.__main__ import main
from jlora._errors import DamagedCheckpointError, NonFiniteError
from jlora.optim import lora_plus, scale_by_lora_plus
from jlora.peft import PeftFormatError

# When orbax fails to read a damaged checkpoint it leaves tensorstore reads in flight; their
# callbacks later find orbax's event loop closed ("Exception ignored ... Event loop is closed" on
# stderr, after jlora's error). Tests that read damaged files let them finish before they end.
reads_damaged_files = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def settle():
    yield
    time.sleep(0.5)
    gc.collect()


def _factors(a, b, scale=1.0):
    return jlora.LoraFactors(jnp.asarray(a), jnp.asarray(b), scale, jlora.Layout(1, 1))


# --- configs and values --------------------------------------------------------------------


def test_an_integer_weight_cannot_be_targeted_or_merged():
    params = {"w": jnp.ones((4, 3), jnp.int32), "v": jnp.ones((4, 3))}
    with pytest.raises(TargetError, match=r"^w: targeted a weight of dtype int32; LoRA adapts"):
        jlora.init(jax.random.key(0), params, LoraConfig(targets="w", rank=1))
    with pytest.warns(jlora.SkippedTargetsWarning, match=r"w: targeted a weight of dtype int32"):
        adapters = jlora.init(
            jax.random.key(0), params, LoraConfig(targets="w|v", rank=1, strict=False)
        )
    assert list(adapters) == ["v"]
    hand_made = {"w": _factors(np.ones((4, 1)), np.ones((1, 3)))}
    with pytest.raises(AdapterMismatchError, match=r"^w: the weight has dtype int32, not floating"):
        jlora.merge(params, hand_made)


def test_a_key_with_a_slash_cannot_share_a_path_with_a_nested_leaf():
    params = {"a/b": jnp.ones((4, 3)), "a": {"b": jnp.zeros((4, 3))}}
    with pytest.raises(TargetError, match=r"^a/b: two leaves of the parameter tree have this"):
        jlora.init(jax.random.key(0), params, LoraConfig(targets="a/b", rank=1))
    with pytest.raises(AdapterMismatchError, match=r"^a/b: two leaves of the parameters have"):
        jlora.merge(params, {"a": {"b": _factors(np.ones((4, 1)), np.ones((1, 3)))}})
    # Without a collision a key holding '/' works as before.
    alone = {"a/b": jnp.zeros((4, 3))}
    merged = jlora.merge(alone, {"a": {"b": _factors(np.ones((4, 1)), np.ones((1, 3)))}})
    np.testing.assert_array_equal(merged["a/b"], np.ones((4, 3)))


def test_an_adapted_nnx_layer_keeps_its_term_for_integer_inputs():
    layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    jlora.nnx.lora(layer, LoraConfig(targets="kernel", rank=1), rngs=nnx.Rngs(1))
    layer.lora_b[...] = jnp.ones((1, 2))  # a trained-looking, non-zero term
    x = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    with jax.numpy_dtype_promotion("standard"):  # nnx.Linear promotes int inputs itself
        got = layer(x)
        expected = layer(x.astype(jnp.float32))
    np.testing.assert_array_equal(got, expected)  # exact: the same program on equal inputs
    merged = jlora.nnx.merge(layer, copy=True)(x.astype(jnp.float32))
    assert float(jnp.abs(expected - merged).max()) < 1e-5
    with pytest.raises(TypeError, match=r"dense_branch: the input has dtype int32; the factors"):
        ops.dense_branch(x, _factors(np.ones((3, 1)), np.ones((1, 2))))


def test_nnx_bias_target_names_what_can_be_adapted():
    model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(
        TargetError,
        match=r"the targets select the 'bias' of nnx.Linear .* \(only its 'kernel' can be adapted\)",
    ):
        jlora.nnx.lora(model, LoraConfig(targets=".*bias", rank=1), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("ratio", [float("inf"), np.float32("nan"), 1j])
def test_lora_plus_refuses_non_finite_ratios(ratio):
    with pytest.raises(ValueError, match=r"LoRA\+ ratio .* is invalid; expected a number > 0"):
        lora_plus(optax.sgd(0.1), ratio)
    assert scale_by_lora_plus(np.float32(4.0)) is not None  # NumPy scalars are numbers too


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 2j, np.complex64(1), True, "2"])
def test_factors_refuse_a_scale_that_is_not_a_finite_real(scale):
    with pytest.raises(ConfigError, match=r"LoraFactors: scale .* is not a finite real number"):
        _factors(np.ones((3, 1)), np.ones((1, 2)), scale)
    assert _factors(np.ones((3, 1)), np.ones((1, 2)), np.float32(0.5)).scale == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": np.complex128(2)}, r"alpha .* is not a number; expected a real float > 0 \(a"),
        ({"alpha": 2j}, r"read as its real part"),
        ({"alpha_pattern": {"w": np.complex64(1)}}, r"alpha_pattern\['w'\]: alpha .* real float"),
        ({"layouts": ["io"]}, r"LoraConfig.layouts: got \['io'\]; expected a mapping"),
        ({"rank_pattern": ["w2"]}, r"LoraConfig.rank_pattern: got \['w2'\]; expected a mapping"),
        ({"dropout": np.float32(1.5)}, r"dropout: np.float32\(1.5\) is invalid; expected a rate"),
    ],
)
def test_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(targets="w", **kwargs)


def test_numpy_scalars_are_valid_config_values():
    config = LoraConfig(targets="w", dropout=np.float32(0.5), alpha=np.float64(4), rank=np.int64(2))
    assert (config.dropout, config.alpha, config.rank) == (0.5, 4.0, 2)
    assert LoraConfig(targets="w", layouts=(("w", "io"),)).layout_for("w") == "io"


# --- finiteness ----------------------------------------------------------------------------


def test_in_memory_merge_can_check_finiteness():
    params = {"w": jnp.ones((2, 2), jnp.bfloat16)}
    huge = {"w": _factors(np.full((2, 1), 1e20), np.full((1, 2), 1e20))}  # overflows bfloat16
    assert not np.isfinite(np.asarray(jlora.merge(params, huge)["w"], np.float32)).any()
    with pytest.raises(NonFiniteError, match=r"^w: the merged weight holds 4 NaN or infinite"):
        jlora.merge(params, huge, check_finite=True)
    with pytest.raises(TypeError, match=r"check_finite=True\) reads the merged values"):
        jax.jit(lambda p: jlora.merge(p, huge, check_finite=True))(params)
    nan_base = {"w": jnp.array([[np.nan, 1.0], [1.0, 1.0]])}
    fine = {"w": _factors(np.ones((2, 1)), np.ones((1, 2)))}
    jlora.merge(nan_base, fine, check_finite=True)  # NaN already in the base: not merge's doing


def test_restore_refuses_nan_factors(tmp_path):
    params = _params()
    bad = jax.tree.map(np.array, _adapters(params))
    bad["stacked"].a[0, 0, 0] = np.nan
    checkpoint.save(tmp_path / "ckpt", bad, CONFIG)
    with pytest.raises(NonFiniteError, match=r"^stacked/a: the checkpoint at .* holds 1 NaN"):
        checkpoint.restore(tmp_path / "ckpt")
    restored, _ = checkpoint.restore(tmp_path / "ckpt", check_finite=False)
    assert np.isnan(restored["stacked"].a).sum() == 1


def test_merge_checkpoint_refuses_an_overflow_before_writing(tmp_path):
    params = {"w": np.ones((4, 3), ml_dtypes.bfloat16), "v": np.ones((4, 3), np.float32)}
    config = LoraConfig(targets="w|v", rank=1, alpha=1.0)
    adapters = {
        "w": _factors(np.full((4, 1), 1e20, np.float32), np.full((1, 3), 1e20, np.float32)),
        "v": _factors(np.ones((4, 1), np.float32), np.ones((1, 3), np.float32)),
    }
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapter", adapters, config)
    with pytest.raises(NonFiniteError, match=r"^w: merging gives 12 NaN or infinite values"):
        checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]
    checkpoint.merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", check_finite=False
    )


def test_peft_load_refuses_nan_tensors(tmp_path):
    params = transformer_params()
    config = LoraConfig(targets=".*attn/query/kernel", rank=2)
    adapters = jax.tree.map(np.array, jlora.init(jax.random.key(0), params, config))
    adapters["layers_0"]["attn"]["query"]["kernel"].b[0, 0] = np.inf
    jpeft.save(tmp_path, adapters, config)
    with pytest.raises(
        NonFiniteError, match=r"tensor 'base_model.model.layers_0.attn.query.lora_B"
    ):
        jpeft.load(tmp_path, params)
    loaded, _ = jpeft.load(tmp_path, params, check_finite=False)
    assert np.isinf(loaded["layers_0"]["attn"]["query"]["kernel"].b).sum() == 1


# --- digests: damaged arrays and another base --------------------------------------------------


def test_restore_detects_arrays_from_another_save(tmp_path):
    params = _params()
    checkpoint.save(tmp_path / "one", _adapters(params, seed=1), CONFIG)
    checkpoint.save(tmp_path / "two", _adapters(params, seed=2), CONFIG)
    shutil.rmtree(tmp_path / "one" / "adapters")
    shutil.copytree(tmp_path / "two" / "adapters", tmp_path / "one" / "adapters")
    with pytest.raises(
        DamagedCheckpointError,
        match=r"^the checkpoint at .*one is damaged: embed/embedding/a differs from the SHA-256",
    ):
        checkpoint.restore(tmp_path / "one")


def _swap_arrays(into, source):
    shutil.rmtree(into / "adapters")
    shutil.copytree(source / "adapters", into / "adapters")


@pytest.mark.parametrize("other", ["same shapes", "other rank", "another target", "one less"])
def test_merge_refuses_mismatched_adapter_arrays_as_restore_does(tmp_path, other):
    # merge_checkpoint reads the adapters once, as NumPy; a record that disagrees with the arrays
    # beside it must still be refused before anything is written, in restore's exact words.
    params = _params()
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "ckpt", _adapters(params, seed=1), CONFIG, base=params)
    config = {
        "same shapes": CONFIG,
        "other rank": dataclasses.replace(CONFIG, rank_pattern={r".*up/kernel": 4}),
        "another target": dataclasses.replace(CONFIG, targets=(*CONFIG.targets, r".*key/kernel")),
        "one less": dataclasses.replace(CONFIG, targets=CONFIG.targets[1:]),
    }[other]
    checkpoint.save(tmp_path / "two", _adapters(params, seed=2, config=config), config)
    _swap_arrays(tmp_path / "ckpt", tmp_path / "two")
    with pytest.raises(DamagedCheckpointError) as restored:
        checkpoint.restore(tmp_path / "ckpt")
    with pytest.raises(DamagedCheckpointError) as merged:
        checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "ckpt", tmp_path / "out")
    assert str(merged.value) == str(restored.value)
    what = "differs from the SHA-256" if other == "same shapes" else "the record and the arrays"
    assert str(merged.value).startswith(f"the checkpoint at {tmp_path / 'ckpt'} is damaged: ")
    assert what in str(merged.value)
    assert sorted(os.listdir(tmp_path)) == ["base", "ckpt", "two"]


@pytest.mark.parametrize("damage", ["truncate", "delete_manifest"])
@reads_damaged_files
def test_merge_names_damaged_adapter_arrays(settle, tmp_path, damage):
    params = _params()
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "ckpt", _adapters(params), CONFIG)
    arrays = tmp_path / "ckpt" / "adapters"
    if damage == "delete_manifest":
        (arrays / "manifest.ocdbt").unlink()
    for file in [p for p in arrays.rglob("*") if p.is_file() and p.parent.name == "d"]:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(DamagedCheckpointError) as info:
        checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "ckpt", tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"the checkpoint at {tmp_path / 'ckpt'} is damaged: ")
    assert len(message) < 700  # one line, not tensorstore's JSON spec
    assert sorted(os.listdir(tmp_path)) == ["base", "ckpt"]


@reads_damaged_files
def test_bit_flips_in_array_data_never_restore_silently(settle, tmp_path):
    params = _params()
    adapters = _adapters(params)
    checkpoint.save(tmp_path / "ckpt", adapters, CONFIG)
    data = sorted(
        (
            p
            for p in (tmp_path / "ckpt" / "adapters").rglob("*")
            if p.is_file() and p.parent.name == "d"
        ),
        key=lambda p: p.stat().st_size,
    )[-1]
    original = data.read_bytes()
    rng = np.random.default_rng(0)
    outcomes = []
    for position in rng.choice(len(original), size=12, replace=False):
        flipped = bytearray(original)
        flipped[position] ^= 1 << int(rng.integers(8))
        data.write_bytes(bytes(flipped))
        try:
            restored, _ = checkpoint.restore(tmp_path / "ckpt")
        except DamagedCheckpointError as e:
            assert str(e).startswith(f"the checkpoint at {tmp_path / 'ckpt'} is damaged: ")
            outcomes.append("refused")
            continue
        # Restored: then it must be exactly what was saved (a flip in unused bytes).
        for path, f in jlora._merge.factors_by_path(adapters).items():
            g = jlora._merge.factors_by_path(restored)[path]
            np.testing.assert_array_equal(g.a, f.a)
            np.testing.assert_array_equal(g.b, f.b)
        outcomes.append("intact")
    data.write_bytes(original)
    # Every flip was refused or changed nothing that is read (the loop asserts the values). How
    # many land in bytes that are read depends on orbax's file layout, which differs between
    # versions (at least 6 of 12 were refused with jax 0.10; none were read with jax 0.12),
    # so the count is not asserted; test_restore_detects_arrays_from_another_save pins detection.
    assert len(outcomes) == 12


def test_another_base_of_the_same_shapes_is_refused(tmp_path):
    params = _params(seed=0)
    other = _params(seed=1)  # same architecture, other values
    adapters = _adapters(params)
    checkpoint.save(tmp_path / "adapter", adapters, CONFIG, base=params)
    with pytest.raises(
        AdapterMismatchError,
        match=r"^embed/embedding: the base given has the same shape and dtype but other values "
        r"than the base the adapters were saved for \(its content digest differs\) \(\d+ differing",
    ):
        checkpoint.restore(tmp_path / "adapter", base=other)
    checkpoint.restore(tmp_path / "adapter", base=other, base_digest=False)
    checkpoint.restore(tmp_path / "adapter", base=params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), other)
    checkpoint.restore(tmp_path / "adapter", base=abstract)  # shapes only: nothing to hash
    _save_base(tmp_path / "other", other)
    with pytest.raises(
        AdapterMismatchError, match=r"^embed/embedding: the base given has the same"
    ):
        checkpoint.merge_checkpoint(tmp_path / "other", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    checkpoint.merge_checkpoint(
        tmp_path / "other", tmp_path / "adapter", tmp_path / "out", base_digest=False
    )
    record = json.loads((tmp_path / "adapter" / "jlora" / "metadata").read_text())
    assert set(record["base_digests"]) == {p for p, _, _ in record["base"]}
    checkpoint.save(tmp_path / "no_digest", adapters, CONFIG, base=params, base_digest=False)
    record = json.loads((tmp_path / "no_digest" / "jlora" / "metadata").read_text())
    assert "base_digests" not in record and record["base"]


# --- damaged or hostile records --------------------------------------------------------------


def _edit_record(path, edit):
    file = path / "jlora" / "metadata"
    record = json.loads(file.read_text())
    edit(record)
    file.write_text(json.dumps(record))


def _set(record, keys, value):
    node = record
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


@pytest.mark.parametrize(
    ("keys", "value", "match"),
    [
        (("adapters", "stacked", "a", "dtype"), "int8", r"factor a dtype 'int8' is not a floating"),
        (("adapters", "stacked", "layout", "fan_in_ndim"), 0, r"needs fan_in_ndim and fan_out"),
        (("adapters", "stacked", "layout", "fan_in_ndim"), 2, r"do not fit its layout"),
        (
            ("adapters", "stacked", "b", "shape"),
            [3, 3, 17],
            r"record \(jlora/metadata\) gives stacked/b shape \(3, 3, 17\) float32 but its "
            r"arrays hold shape \(3, 3, 16\) float32",
        ),
        (
            ("adapters", "stacked", "a", "shape"),
            [3, 8, 4],
            r"factors a \(3, 8, 4\), b \(3, 3, 16\)",
        ),
        (("trainable",), {"x": {"shape": [2], "dtype": "int32"}}, r"trainable 'x' dtype 'int32'"),
        (("adapters",), [], r"'adapters' is \[\]; expected a dict"),
        (("config", "rank"), -1, r"rank -1 is invalid"),
    ],
)
def test_a_damaged_record_names_the_checkpoint(tmp_path, keys, value, match):
    params = _params()
    checkpoint.save(tmp_path / "ckpt", _adapters(params), CONFIG)
    _edit_record(tmp_path / "ckpt", lambda record: _set(record, keys, value))
    prefix = rf"^the checkpoint at {tmp_path / 'ckpt'} is damaged: "
    with pytest.raises(DamagedCheckpointError, match=prefix + ".*" + match):
        checkpoint.restore(tmp_path / "ckpt")


@pytest.mark.parametrize("content", ["", "{", "\x00" * 64])
def test_an_unreadable_record_names_its_file(tmp_path, content):
    params = _params()
    checkpoint.save(tmp_path / "ckpt", _adapters(params), CONFIG)
    (tmp_path / "ckpt" / "jlora" / "metadata").write_text(content)
    record = tmp_path / "ckpt" / "jlora" / "metadata"
    with pytest.raises(DamagedCheckpointError, match=rf"damaged: its record {record} cannot be"):
        checkpoint.restore(tmp_path / "ckpt")


@pytest.mark.parametrize("damage", ["truncate", "delete_manifest", "zero"])
@reads_damaged_files
def test_damaged_array_files_name_the_checkpoint(settle, tmp_path, damage):
    params = _params()
    checkpoint.save(tmp_path / "ckpt", _adapters(params), CONFIG)
    arrays = tmp_path / "ckpt" / "adapters"
    files = [p for p in arrays.rglob("*") if p.is_file() and p.parent.name == "d"]
    if damage == "delete_manifest":
        (arrays / "manifest.ocdbt").unlink()
    for file in files:
        size = file.stat().st_size
        if damage == "truncate":
            file.write_bytes(file.read_bytes()[: size // 2])
        elif damage == "zero":
            file.write_bytes(b"\0" * size)
    with pytest.raises(DamagedCheckpointError) as info:
        checkpoint.restore(tmp_path / "ckpt")
    message = str(info.value)
    assert message.startswith(f"the checkpoint at {tmp_path / 'ckpt'} is damaged: ")
    assert len(message) < 700  # one line, not tensorstore's JSON spec


@reads_damaged_files
def test_a_damaged_base_names_the_checkpoint(settle, tmp_path):
    params = _params()
    _save_base(tmp_path / "base", params)
    checkpoint.save(tmp_path / "adapter", _adapters(params), CONFIG)
    for file in (tmp_path / "base").rglob("*"):
        if file.is_file() and file.parent.name == "d":
            file.write_bytes(b"\0" * file.stat().st_size)
    with pytest.raises(DamagedCheckpointError, match=rf"^the checkpoint at {tmp_path / 'base'} is"):
        checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"]


def test_relative_paths_save_and_restore(tmp_path, monkeypatch):
    params = _params()
    adapters = _adapters(params)
    monkeypatch.chdir(tmp_path)
    path = checkpoint.save("rel", adapters, CONFIG, step=2)
    assert path == tmp_path / "rel" / "2"
    restored, _ = checkpoint.restore("rel")
    np.testing.assert_array_equal(restored["stacked"].a, adapters["stacked"].a)
    assert sorted(os.listdir(tmp_path / "rel")) == ["2"]


def test_group_mib_must_be_positive(capsys):
    for value in ("-1", "0", "nan", "inf", "x"):
        with pytest.raises(SystemExit) as info:
            main(["merge", "--base", "b", "--adapter", "a", "--out", "o", "--group-mib", value])
        assert info.value.code == 2
        assert "is not a positive number of MiB" in capsys.readouterr().err


# --- PEFT files --------------------------------------------------------------------------------


def _peft_saved(directory, seed=1, alpha=6.0):
    params = transformer_params()
    config = LoraConfig(targets=".*attn/(query|value)/kernel", rank=2, alpha=alpha)
    shapes = jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, config))
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), shapes)
    jpeft.save(directory, adapters, config)
    return params, adapters, config


def _edit_json(file, **changes):
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, **changes}))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"alpha_pattern": {"q(": 4}}, r"alpha_pattern key 'q\(' is not a valid regular expr"),
        ({"rank_pattern": {"[": 2}}, r"rank_pattern key '\[' is not a valid regular expression"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights = 'pissa' is not supported: that"),
        ({"init_lora_weights": "olora"}, r"residual base"),
        ({"init_lora_weights": "loftq"}, r"residual base"),
        ({"init_lora_weights": "pissa_niter_4"}, r"residual base"),
    ],
)
def test_peft_configs_that_would_load_wrongly_are_refused(tmp_path, changes, match):
    params, _, _ = _peft_saved(tmp_path)
    _edit_json(tmp_path / "adapter_config.json", **changes)
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # as PEFT writes it
    with pytest.raises(PeftFormatError, match=match):
        jpeft.load(tmp_path, params)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", None])
def test_peft_initialisations_that_keep_the_base_load(tmp_path, init):
    params, adapters, _ = _peft_saved(tmp_path)
    _edit_json(tmp_path / "adapter_config.json", init_lora_weights=init)
    loaded, _ = jpeft.load(tmp_path, params)
    path = "layers_0/attn/query/kernel"
    np.testing.assert_array_equal(
        jlora._merge.factors_by_path(loaded)[path].a, jlora._merge.factors_by_path(adapters)[path].a
    )


def test_a_peft_pair_from_two_saves_is_refused(tmp_path):
    params, _, _ = _peft_saved(tmp_path / "one", seed=1, alpha=6.0)
    _peft_saved(tmp_path / "two", seed=2, alpha=3.0)
    shutil.copy(tmp_path / "two" / "adapter_config.json", tmp_path / "one")
    with pytest.raises(
        PeftFormatError,
        match=r"one: adapter_model.safetensors was written with another adapter_config.json",
    ):
        jpeft.load(tmp_path / "one", params)
    # Descriptive keys may be edited by hand.
    _peft_saved(tmp_path / "three")
    _edit_json(tmp_path / "three" / "adapter_config.json", base_model_name_or_path="/local/x")
    jpeft.load(tmp_path / "three", params)


def test_a_save_killed_between_its_renames_is_completed(tmp_path):
    params, _, _ = _peft_saved(tmp_path, seed=1, alpha=6.0)
    # What a kill between the two renames leaves: the new tensors in place, the new config staged.
    _peft_saved(tmp_path / "new", seed=2, alpha=3.0)
    shutil.copy(tmp_path / "new" / "adapter_model.safetensors", tmp_path)
    shutil.copy(tmp_path / "new" / "adapter_config.json", tmp_path / ".adapter_config.json.k1.tmp")
    (tmp_path / ".adapter_config.json.k2.tmp").write_text('{"half written')
    loaded, config = jpeft.load(tmp_path, params)
    assert config.alpha == 3.0
    np.testing.assert_array_equal(
        loaded["layers_1"]["attn"]["value"]["kernel"].b,
        jpeft.load(tmp_path / "new", params)[0]["layers_1"]["attn"]["value"]["kernel"].b,
    )
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 3
    _peft_saved(tmp_path, seed=3)  # the next save removes what is left staged
    assert sorted(os.listdir(tmp_path)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "new",
    ]


def test_damaged_peft_tensors_are_refused(tmp_path):
    params, _, _ = _peft_saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    with open(weights, "rb") as fh:
        header = fh.read(8)
    data = bytearray(weights.read_bytes())
    data[8 + int.from_bytes(header, "little") + 5] ^= 0x10  # one bit of tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(PeftFormatError, match=r"adapter_model.safetensors: the file is damaged"):
        jpeft.load(tmp_path, params)


def test_checkpoint_and_merge_read_bfloat16_and_float32_records(tmp_path):
    # The record's dtype check accepts every floating dtype jlora writes.
    params = _params()
    config = LoraConfig(**{**CONFIG.to_dict(), "dtype": "bfloat16"})
    adapters = jax.tree.map(lambda x: np.asarray(x, ml_dtypes.bfloat16), _adapters(params))
    checkpoint.save(tmp_path / "ckpt", adapters, config, base=params)
    restored, _ = checkpoint.restore(tmp_path / "ckpt", base=params)
    assert restored["stacked"].a.dtype == jnp.bfloat16
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "base", params)
    checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "ckpt", tmp_path / "out")


# --- shardings ---------------------------------------------------------------------------------


def test_merge_names_adapters_on_another_mesh():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices())
    first, second = Mesh(devices[:4], ("x",)), Mesh(devices[4:], ("x",))
    params = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(first, P("x", None)))}
    adapters = jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(second, P())),
        {"w": _factors(np.ones((8, 2), np.float32), np.ones((2, 4), np.float32))},
    )
    with pytest.raises(
        AdapterMismatchError,
        match=r"^w: the weight is on devices \[0, 1, 2, 3\] but its adapter's factors are on "
        r"\[4, 5, 6, 7\] \(a\)",
    ):
        jlora.merge(params, adapters)


def test_factor_specs_that_do_not_divide_their_axis_are_refused(tmp_path):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jlora.sharding

    mesh = Mesh(np.array(jax.devices()[:3]), ("x",))
    adapters = {"w": _factors(np.ones((8, 2), np.float32), np.ones((2, 4), np.float32))}
    match = r"^w: factor b: PartitionSpec P\(None, 'x'\) splits axis 1 of shape \(2, 4\) into 3"
    with pytest.raises(AdapterMismatchError, match=match):
        jlora.sharding.factor_shardings(adapters, {"w": P(None, "x")}, mesh)
    with pytest.raises(AdapterMismatchError, match=match):
        jlora.sharding.check_factor_shardings(adapters, {"w": {"a": P(), "b": P(None, "x")}}, mesh)
    config = LoraConfig(targets="w", rank=2, alpha=2.0)
    checkpoint.save(tmp_path / "ckpt", adapters, config)
    with pytest.raises(AdapterMismatchError, match=r"^w/b: PartitionSpec P\(None, 'x'\) splits"):
        checkpoint.restore(
            tmp_path / "ckpt",
            shardings={
                "w": {"a": NamedSharding(mesh, P()), "b": NamedSharding(mesh, P(None, "x"))}
            },
        )


# --- every public entry point: plain values of the wrong kind ----------------------------------
# One row per class the sweep of issue 12 found raising a raw os/jax/optax error or accepting a
# wrong value silently; each now names the parameter, what it got and what it expects.

_P = {"dense": {"kernel": jnp.ones((4, 3))}, "emb": {"embedding": jnp.ones((10, 4))}}
_C = LoraConfig(targets="dense/kernel", rank=2)


def _small():
    adapters = jlora.init(jax.random.key(0), _P, _C)
    return adapters, adapters["dense"]["kernel"]


def _embedding_factors():
    config = LoraConfig(targets="emb/embedding", rank=2)
    return jlora.init(jax.random.key(0), _P, config)["emb"]["embedding"]


_PATHS = [
    (lambda d, a: checkpoint.save(None, a, _C), "directory: got None; expected a directory path"),
    (lambda d, a: checkpoint.save(3, a, _C), r"directory: got a int \(3\); expected a directory"),
    (lambda d, a: checkpoint.restore(""), "directory: got a str .*expected a directory path"),
    (lambda d, a: checkpoint.steps(None), "directory: got None"),
    (lambda d, a: checkpoint.merge_checkpoint(None, d, d / "o"), "base_dir: got None"),
    (lambda d, a: checkpoint.merge_checkpoint(d, None, d / "o"), "adapter_dir: got None"),
    (lambda d, a: checkpoint.recover_merge(None), "out_dir: got None"),
    (lambda d, a: jpeft.save(None, a, _C), "directory: got None"),
    (lambda d, a: jpeft.load(None, _P), "directory: got None"),
]


@pytest.mark.parametrize("call, match", _PATHS)
def test_paths_that_are_not_paths_are_named(tmp_path, call, match):
    adapters, _ = _small()
    with pytest.raises(TypeError, match=match):
        call(tmp_path, adapters)


def test_a_file_where_a_directory_is_expected_is_named(tmp_path):
    adapters, _ = _small()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"^directory {afile}: is a file; expected a"):
        checkpoint.steps(afile)
    with pytest.raises(
        NotADirectoryError, match=rf"^directory {afile}: is a file, not a directory"
    ):
        jpeft.save(afile, adapters, _C)
    with pytest.raises(NotADirectoryError, match=rf"lies under {afile}, which is a file"):
        jpeft.save(afile / "p", adapters, _C)
    with pytest.raises(OSError, match=rf"{afile}/ck: cannot create the checkpoint's directory "):
        checkpoint.save(afile / "ck", adapters, _C)
    with pytest.raises(NotADirectoryError, match=rf"^out {afile}/o: lies under {afile}, which is"):
        checkpoint.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", afile / "o")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


_FLAGS = [
    (lambda d, a: jlora.merge(_P, a, check_finite="yes"), "check_finite: got a str"),
    (lambda d, a: checkpoint.restore(d, check_finite="no"), "check_finite: got a str"),
    (lambda d, a: checkpoint.restore(d, base_digest=None), "base_digest: got None"),
    (lambda d, a: checkpoint.save(d / "s", a, _C, base_digest=1), r"base_digest: got a int \(1\)"),
    (lambda d, a: checkpoint.merge_checkpoint(d, d, d / "o", overwrite="no"), "overwrite: got a"),
    (lambda d, a: jpeft.load(d, _P, check_finite=0), "check_finite: got a int"),
    (lambda d, a: jpeft.save(d / "p", a, _C, flatten="no"), "flatten: got a str"),
]


@pytest.mark.parametrize("call, match", _FLAGS)
def test_flags_take_only_booleans(tmp_path, call, match):
    adapters, _ = _small()
    checkpoint.save(tmp_path, adapters, _C, step=0)
    with pytest.raises(TypeError, match=rf"^{match}.*; expected True or False$"):
        call(tmp_path, adapters)


def test_numpy_integer_steps_are_steps(tmp_path):
    adapters, _ = _small()
    assert checkpoint.save(tmp_path, adapters, _C, step=np.int64(3)).name == "3"
    assert checkpoint.restore(tmp_path, step=np.int32(3))[1] == _C
    with pytest.raises(ValueError, match=r"^step: np.True_ is invalid; expected an integer >= 0"):
        checkpoint.restore(tmp_path, step=np.True_)


_KEYS = [
    (lambda: jlora.init(None, _P, _C), "key: got None; expected a PRNG key"),
    (lambda: jlora.init(0, _P, _C), r"key: got a int \(0\); expected a PRNG key"),
    (
        lambda: jlora.lowrank.init_factors("k", 4, 3, 1),
        r"key: got a str \(.k.\); expected a PRNG key",
    ),
    (lambda: ops.dropout(jnp.ones(3), 0.5, 7), r"rng: got a int \(7\); expected a PRNG key"),
]


@pytest.mark.parametrize("call, match", _KEYS)
def test_prng_keys_are_checked(call, match):
    with pytest.raises(TypeError, match=rf"^{match}, e.g. jax.random.key\(0\)"):
        call()


def test_legacy_uint32_keys_still_work():
    adapters = jlora.init(jax.random.PRNGKey(0), _P, _C)
    assert adapters["dense"]["kernel"].a.shape == (4, 2)


_TYPES = [
    (lambda a, f: jlora.init(jax.random.key(0), _P, "x"), "config: got a str .*expected a jlora"),
    (lambda a, f: jpeft.save("p", a, None), "config: got None; expected the jlora.LoraConfig"),
    (lambda a, f: jpeft.save("p", a, _C, path_to_module="x"), "path_to_module: got a str"),
    (lambda a, f: jpeft.save("p", a, _C, target_modules=123), "target_modules: got a int"),
    (lambda a, f: jpeft.load("p", _P, module_to_path=None), "module_to_path: got None"),
    (lambda a, f: jlora.optim.lora_plus(None), "optimizer: got None; expected an optax"),
    (lambda a, f: jlora.optim.freeze_base(optax.adam), r"optimizer: got the function optax\."),
    (lambda a, f: jlora.summary(a, kinds="x"), "kinds: got a str"),
    (lambda a, f: ops.dense_branch(jnp.ones((2, 4)), None), "dense_branch: factors is None"),
    (lambda a, f: ops.dense_branch(None, f), "dense_branch: the input is None; expected an array"),
    (lambda a, f: ops.lookup_branch(jnp.ones(2), f), "lookup_branch: ids is .* dtype float32"),
    (lambda a, f: jlora.analysis.singular_basis(None), "singular_basis: factors is None"),
]


@pytest.mark.parametrize("call, match", _TYPES)
def test_values_of_the_wrong_type_are_named(call, match):
    adapters, factors = _small()
    with pytest.raises(TypeError, match=rf"^{match}"):
        call(adapters, factors)


_VALUES = [
    (lambda a, f: jlora.merge(_P, None), AdapterMismatchError, "adapters: got None; expected"),
    (lambda a, f: jlora.unmerge(_P, None), AdapterMismatchError, "adapters: got None"),
    (lambda a, f: jlora.delta(None), AdapterMismatchError, "adapters: got None"),
    (lambda a, f: jlora.summary(None), AdapterMismatchError, "adapters: got None"),
    (lambda a, f: jlora.count_params(_P, None), AdapterMismatchError, "adapters: got None"),
    (lambda a, f: jlora.count_params(None, a), TypeError, "params: got None"),
    (lambda a, f: LoraConfig(targets=""), ConfigError, "LoraConfig.targets: '' is an empty"),
    (lambda a, f: jlora.Layout(0, 1), ValueError, r"Layout.fan_in_ndim: 0 is invalid"),
    (lambda a, f: jlora.Layout(1, "a"), ValueError, r"Layout.fan_out_ndim: 'a' is invalid"),
    (lambda a, f: jlora.LoraFactors(f.a, f.b, 1.0, None), ConfigError, "LoraFactors: layout None"),
    (
        lambda a, f: ops.dropout(jnp.ones(3), float("nan"), None),
        ValueError,
        "LoRA dropout rate nan",
    ),
    (
        lambda a, f: ops.dense_branch(jnp.ones((2, 4)), f, dropout_rate=1.5, rng=None),
        ValueError,
        r"LoRA dropout rate 1.5 is invalid; expected a number in \[0, 1\)",
    ),
    (
        lambda a, f: ops.dense_branch(jnp.ones((2, 4)), jlora.LoraFactors(f.a, f.a, 1.0, f.layout)),
        AdapterMismatchError,
        r"dense_branch: factors a \(4, 2\) and b \(4, 2\) disagree on the rank",
    ),
    (
        lambda a, f: ops.attend_branch(jnp.ones((2, 7)), _embedding_factors()),
        AdapterMismatchError,
        r"attend_branch: the query's last axis \(7,\) does not match the embedding's features",
    ),
    (
        lambda a, f: jlora.analysis.subspace_similarity(np.full((4, 2), np.nan), np.eye(4)),
        ValueError,
        "u1: holds 8 NaN or infinite values",
    ),
    (lambda a, f: jlora.analysis.lora_param_count(2, 8, -1), ValueError, "rank: -1 is invalid"),
    (
        lambda a, f: jlora.analysis.adapter_tuning_param_count(1.5, 8, 2, 1),
        ValueError,
        "num_adapters: 1.5 is invalid; expected an integer >= 0",
    ),
    (lambda a, f: jpeft.module_to_path(None, "linear"), PeftFormatError, "module_to_path: module"),
    (
        lambda a, f: jpeft.module_to_path("a", "conv"),
        PeftFormatError,
        "module_to_path: kind 'conv'",
    ),
    (lambda a, f: jpeft.path_to_module(3), PeftFormatError, "path_to_module: got 3"),
]


@pytest.mark.parametrize("call, error, match", _VALUES)
def test_wrong_values_are_refused_not_taken(call, error, match):
    adapters, factors = _small()
    with pytest.raises(error, match=rf"^{match}"):
        call(adapters, factors)


def test_plots_name_a_bad_grid_or_path(tmp_path):
    plot = jlora.analysis.plot_subspace_similarity
    with pytest.raises(ValueError, match=r"^grid: expected a 2-D array .*found shape \(3,\)"):
        plot(np.ones(3), str(tmp_path / "g.png"))
    with pytest.raises(FileNotFoundError, match=r"its directory .*nodir does not exist; expected"):
        plot(np.eye(2), str(tmp_path / "nodir" / "g.png"))
    with pytest.raises(FileNotFoundError, match=rf"^path {tmp_path}: is a directory; expected"):
        plot(np.eye(2), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_directory_of_another_kind_is_named(tmp_path):
    adapters, _ = _small()
    ckpt = checkpoint.save(tmp_path / "ckpt", adapters, _C)
    peft_dir, base, out = tmp_path / "peft", tmp_path / "base", tmp_path / "out"
    jpeft.save(peft_dir, adapters, _C)
    _save_base(base, _P)
    with pytest.raises(
        FileNotFoundError, match=r"peft holds a PEFT adapter: read it with jlora\.pe"
    ):
        checkpoint.restore(peft_dir)
    with pytest.raises(FileNotFoundError, match=r"base is an orbax PyTree checkpoint \(a model's"):
        checkpoint.restore(base)
    with pytest.raises(
        FileNotFoundError, match=r"ckpt is a jlora adapter checkpoint: read it with"
    ):
        jpeft.load(ckpt, _P)
    with pytest.raises(ValueError, match=rf"^base {peft_dir} is a PEFT adapter; expected the base"):
        checkpoint.merge_checkpoint(peft_dir, ckpt, out)
    with pytest.raises(FileNotFoundError, match=r"peft holds a PEFT adapter"):
        checkpoint.merge_checkpoint(base, peft_dir, out)
    assert not out.exists()
