import json
import math
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file
from trees import random_factors, transformer_params

import jlora
from jlora import AdapterMismatchError, LoraConfig, ops
from jlora import peft as jpeft
from jlora.peft import PeftFormatError

CONFIG = LoraConfig(
    targets=(r".*/kernel", r"embed/embedding"),
    rank=4,
    alpha=6,
    rank_pattern={r".*mlp/up/kernel": 2, r"embed/embedding": 3},
    alpha_pattern={r"layers_1/.*": 10.5},
    dropout=0.1,
)


def _trained(params, config=CONFIG, seed=1):
    # Shapes from jlora.init (traced only: compiling its random draws is slow), values random.
    abstract = jax.eval_shape(lambda: jlora.init(jax.random.key(0), params, config))
    return random_factors(abstract, seed=seed)


def _flat(adapters):
    return dict(jlora._merge.factors_by_path(adapters))


def _peft_resolve(table, default, module):
    """PEFT's rule, written out again here: first key whose regex matches a dotted suffix."""
    for key, value in table.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _peft_scale(cfg, module):
    r = _peft_resolve(cfg["rank_pattern"], cfg["r"], module)
    alpha = _peft_resolve(cfg["alpha_pattern"], cfg["lora_alpha"], module)
    return alpha / (math.sqrt(r) if cfg["use_rslora"] else r)


def _read_files(directory):
    with open(os.path.join(directory, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    return cfg, load_file(os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_round_trip_is_exact(tmp_path, use_rslora):
    params = transformer_params()
    config = LoraConfig(**{**CONFIG.to_dict(), "use_rslora": use_rslora})
    adapters = _trained(params, config)
    jpeft.save(tmp_path, adapters, config)
    loaded, loaded_config = jpeft.load(tmp_path, params)
    assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
    for path, f in _flat(adapters).items():
        g = _flat(loaded)[path]
        np.testing.assert_array_equal(g.a, f.a)
        np.testing.assert_array_equal(g.b, f.b)
        assert (g.scale, g.layout, g.a.dtype) == (f.scale, f.layout, f.a.dtype)
        assert loaded_config.scale_for(path) == config.scale_for(path)
        assert loaded_config.rank_for(path) == config.rank_for(path)
    assert (loaded_config.dropout, loaded_config.use_rslora) == (0.1, use_rslora)
    fresh = jax.eval_shape(lambda: jlora.init(jax.random.key(1), params, loaded_config))
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, adapters)
    np.testing.assert_array_equal(  # exact: equal factors through the same eager merge ops
        jlora.merge(params, loaded)["layers_1"]["mlp"]["up"]["kernel"],
        jlora.merge(params, adapters)["layers_1"]["mlp"]["up"]["kernel"],
    )


@settings(max_examples=25, deadline=None)
@given(
    fan_in=st.integers(1, 7),
    fan_out=st.integers(1, 7),
    data=st.data(),
    alpha=st.floats(0.01, 100.0),
    use_rslora=st.booleans(),
    embedding=st.booleans(),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
def test_round_trip_is_exact_for_random_shapes(
    fan_in, fan_out, data, alpha, use_rslora, embedding, dtype
):
    rank = data.draw(st.integers(1, min(fan_in, fan_out)))
    leaf = "embedding" if embedding else "kernel"
    params = {"m": {leaf: np.zeros((fan_in, fan_out), np.float32)}}
    config = LoraConfig(
        targets=f"m/{leaf}", rank=rank, alpha=alpha, use_rslora=use_rslora, dtype=dtype
    )
    adapters = _trained(params, config, seed=data.draw(st.integers(0, 2**16)))
    with tempfile.TemporaryDirectory() as d:
        jpeft.save(d, adapters, config)
        loaded, loaded_config = jpeft.load(d, params)
    f, g = adapters["m"][leaf], loaded["m"][leaf]
    np.testing.assert_array_equal(g.a, np.asarray(f.a, np.float32))  # bfloat16 widens exactly
    np.testing.assert_array_equal(g.b, np.asarray(f.b, np.float32))
    assert (g.scale, g.layout) == (f.scale, f.layout)
    assert loaded_config.scale_for(f"m/{leaf}") == config.scale_for(f"m/{leaf}")


def test_files_follow_peft_names_shapes_and_config(tmp_path):
    params = transformer_params(d_model=16, d_ff=32, vocab=11)
    adapters = _trained(params)
    jpeft.save(tmp_path, adapters, CONFIG, base_model_name_or_path="org/model")
    cfg, tensors = _read_files(tmp_path)
    up = "base_model.model.layers_0.mlp.up"
    assert tensors[f"{up}.lora_A.weight"].shape == (2, 16)  # (r, in)
    assert tensors[f"{up}.lora_B.weight"].shape == (32, 2)  # (out, r)
    assert tensors["base_model.model.embed.lora_embedding_A"].shape == (3, 11)  # (r, vocab)
    assert tensors["base_model.model.embed.lora_embedding_B"].shape == (16, 3)  # (d, r)
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    f = adapters["layers_0"]["mlp"]["up"]["kernel"]
    np.testing.assert_array_equal(tensors[f"{up}.lora_A.weight"], np.asarray(f.a).T)
    np.testing.assert_array_equal(tensors[f"{up}.lora_B.weight"], np.asarray(f.b).T)
    assert len(tensors) == 2 * (1 + 2 * 6)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] is None
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (
        4,
        6,
        0.1,
        False,
    )
    assert (cfg["bias"], cfg["use_dora"], cfg["base_model_name_or_path"]) == (
        "none",
        False,
        "org/model",
    )
    assert cfg["rank_pattern"] == {"embed": 3, "layers_0.mlp.up": 2, "layers_1.mlp.up": 2}
    assert cfg["alpha_pattern"] == {
        f"layers_1.{m}": 10.5 for m in ("attn.query", "attn.key", "attn.value", "attn.out")
    } | {"layers_1.mlp.up": 10.5, "layers_1.mlp.down": 10.5}
    assert cfg["target_modules"] == sorted(
        ["embed"]
        + [f"layers_{i}.attn.{m}" for i in (0, 1) for m in ("query", "key", "value", "out")]
        + [f"layers_{i}.mlp.{m}" for i in (0, 1) for m in ("up", "down")]
    )
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# Flax-style names on one side, Hugging Face torch names on the other.
_TORCH = {"attn/query": "self_attn.q_proj", "mlp/up": "mlp.up_proj", "mlp/down": "mlp.down_proj"}


def _to_torch(path):
    if path == "embed/embedding":
        return "model.embed_tokens"
    layer, rest = re.fullmatch(r"layers_(\d+)/(.*)/kernel", path).groups()
    return f"model.layers.{layer}.{_TORCH[rest]}"


def _to_flax(module, kind):
    if module == "model.embed_tokens":
        assert kind == "embedding"
        return "embed/embedding"
    layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", module).groups()
    return f"layers_{layer}/{dict(map(reversed, _TORCH.items()))[rest]}/kernel"


def _flax_forward(params, ids, adapters=None):
    """Embed, then per layer h += down(relu(up(query(h)))): merged weights, or factored branches."""

    def dense(p, path, x):
        y = x @ p["kernel"] + p["bias"][None, None, :]
        return y if adapters is None else y + ops.dense_branch(x, _flat(adapters)[path])

    h = jnp.take(params["embed"]["embedding"], ids, axis=0)
    if adapters is not None:
        h = h + ops.lookup_branch(ids, _flat(adapters)["embed/embedding"])
    for i in (0, 1):
        lp = params[f"layers_{i}"]
        q = dense(lp["attn"]["query"], f"layers_{i}/attn/query/kernel", h)
        u = jax.nn.relu(dense(lp["mlp"]["up"], f"layers_{i}/mlp/up/kernel", q))
        h = h + dense(lp["mlp"]["down"], f"layers_{i}/mlp/down/kernel", u)
    return h


def _peft_forward(torch_state, directory, ids):
    """What PEFT computes, in float64, from a torch-convention state dict and the adapter files."""
    cfg, tensors = _read_files(directory)
    w = {k: np.asarray(v, np.float64) for k, v in torch_state.items()}
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}

    def linear(module, x):
        y = x @ w[f"{module}.weight"].T + w[f"{module}.bias"]
        a = t[f"base_model.model.{module}.lora_A.weight"]
        b = t[f"base_model.model.{module}.lora_B.weight"]
        return y + _peft_scale(cfg, module) * (x @ a.T) @ b.T

    emb = "model.embed_tokens"
    h = w[f"{emb}.weight"][ids]
    a_t = t[f"base_model.model.{emb}.lora_embedding_A"].T
    h = h + _peft_scale(cfg, emb) * a_t[ids] @ t[f"base_model.model.{emb}.lora_embedding_B"].T
    for i in (0, 1):
        q = linear(f"model.layers.{i}.self_attn.q_proj", h)
        u = np.maximum(linear(f"model.layers.{i}.mlp.up_proj", q), 0.0)
        h = h + linear(f"model.layers.{i}.mlp.down_proj", u)
    return h


@pytest.mark.parametrize("use_rslora", [False, True])
def test_numeric_parity_with_peft_forward(tmp_path, use_rslora):
    params = transformer_params(d_model=16, d_ff=32, vocab=11)
    config = LoraConfig(
        targets=(r".*(query|up|down)/kernel", "embed/embedding"),
        rank=4,
        alpha=6,
        rank_pattern={r"layers_1/mlp/.*": 2, "embed/embedding": 3},
        alpha_pattern={r".*query/kernel": 20},
        use_rslora=use_rslora,
    )
    # Small factors keep activations O(1), so float32 round-off stays far below the tolerance.
    adapters = jax.tree.map(lambda x: np.float32(0.2) * x, _trained(params, config))
    jpeft.save(tmp_path, adapters, config, path_to_module=_to_torch)
    torch_state = {"model.embed_tokens.weight": params["embed"]["embedding"]}
    for path in (p for p in _flat(adapters) if p.endswith("/kernel")):
        layer = params
        for key in path.split("/")[:-1]:
            layer = layer[key]
        torch_state[_to_torch(path) + ".weight"] = layer["kernel"].T  # torch Linear: (out, in)
        torch_state[_to_torch(path) + ".bias"] = layer["bias"]
    ids = np.random.default_rng(0).integers(0, 11, size=(3, 5))
    expected = _peft_forward(torch_state, tmp_path, ids)
    loaded, _ = jpeft.load(tmp_path, params, module_to_path=_to_flax)
    merged = _flax_forward(jlora.merge(params, loaded), jnp.asarray(ids))
    factored = _flax_forward(params, jnp.asarray(ids), adapters=loaded)
    base = _flax_forward(params, jnp.asarray(ids))
    assert np.abs(expected - np.asarray(base, np.float64)).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(factored, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("rank_pattern", "written"),
    [
        ({"layers/.*": 2}, {r"^layers\.0\.q": 2}),
        ({"enc/.*": 3, "layers/.*": 2}, {r"^enc\.layers\.0\.q": 3, r"^layers\.0\.q": 2}),
        ({"enc/.*": 3}, {"enc.layers.0.q": 3}),  # no ambiguity: plain module names
    ],
)
def test_patterns_are_anchored_when_a_module_name_is_a_suffix_of_another(
    tmp_path, rank_pattern, written
):
    w = np.zeros((6, 5), np.float32)
    params = {"layers": {"0": {"q": {"kernel": w}}}, "enc": {"layers": {"0": {"q": {"kernel": w}}}}}
    config = LoraConfig(targets=".*kernel", rank=4, alpha=8, rank_pattern=rank_pattern)
    adapters = _trained(params, config)
    jpeft.save(tmp_path, adapters, config)
    cfg, _ = _read_files(tmp_path)
    # A plain key 'layers.0.q' would also give 'enc.layers.0.q' its rank under PEFT's suffix rule.
    assert cfg["rank_pattern"] == written
    for table in (written, dict(reversed(written.items()))):  # PEFT may reorder the keys
        for path in ("layers/0/q/kernel", "enc/layers/0/q/kernel"):
            module = path.removesuffix("/kernel").replace("/", ".")
            assert _peft_resolve(table, cfg["r"], module) == config.rank_for(path)
    loaded, _ = jpeft.load(tmp_path, params)
    for path, f in _flat(adapters).items():
        np.testing.assert_array_equal(_flat(loaded)[path].a, f.a)
        assert _flat(loaded)[path].scale == f.scale


def _write_peft(directory, cfg, tensors):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))


_PEFT_CFG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 16,
    "target_modules": ["up", "down"],
    "rank_pattern": {"up": 2},
    "alpha_pattern": {"^layers_1.mlp.down": 3},
    "use_rslora": False,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "use_dora": False,
}


def _peft_tensors(dtype, d=16, ff=32):
    rng = np.random.default_rng(3)
    out = {}
    for i in (0, 1):
        m = f"base_model.model.layers_{i}.mlp"
        out[f"{m}.up.lora_A.weight"] = rng.normal(size=(2, d)).astype(dtype)
        out[f"{m}.up.lora_B.weight"] = rng.normal(size=(ff, 2)).astype(dtype)
        out[f"{m}.down.lora_A.weight"] = rng.normal(size=(4, ff)).astype(dtype)
        out[f"{m}.down.lora_B.weight"] = rng.normal(size=(d, 4)).astype(dtype)
    return out


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_reads_peft_written_half_precision_with_suffix_patterns(tmp_path, dtype):
    params = transformer_params(d_model=16, d_ff=32)
    tensors = _peft_tensors(dtype)
    _write_peft(tmp_path, _PEFT_CFG, tensors)
    adapters, config = jpeft.load(tmp_path, params)
    flat = _flat(adapters)
    assert sorted(flat) == [f"layers_{i}/mlp/{m}/kernel" for i in (0, 1) for m in ("down", "up")]
    scales = {"up": 16 / 2, "down": 16 / 4}
    for path, f in flat.items():
        module = "base_model.model." + path.removesuffix("/kernel").replace("/", ".")
        a_t = tensors[module + ".lora_A.weight"].astype(np.float32).T
        np.testing.assert_array_equal(f.a, a_t)
        np.testing.assert_array_equal(f.b, tensors[module + ".lora_B.weight"].astype(np.float32).T)
        expected = 3 / 4 if path == "layers_1/mlp/down/kernel" else scales[path.split("/")[2]]
        assert f.a.dtype == jnp.float32 and f.scale == expected == config.scale_for(path)
    assert (config.rank, config.alpha, config.dropout, config.init) == (
        4,
        16,
        0.05,
        "kaiming_uniform",
    )


def test_embedding_under_another_leaf_name_keeps_its_layout(tmp_path):
    params = {"wte": {"table": np.ones((10, 4), np.float32)}}
    config = LoraConfig(targets="wte/table", rank=2, layouts={"wte/table": "vo"})
    adapters = _trained(params, config)
    jpeft.save(tmp_path, adapters, config, path_to_module=lambda p: "wte")
    loaded, loaded_config = jpeft.load(tmp_path, params, module_to_path=lambda m, kind: "wte/table")
    assert loaded["wte"]["table"].layout == jlora.Layout(1, 1, embedding=True)
    assert loaded_config.layout_for("wte/table") == "vo"
    np.testing.assert_array_equal(loaded["wte"]["table"].b, adapters["wte"]["table"].b)


def test_short_target_modules_and_task_type(tmp_path):
    params = transformer_params()
    config = LoraConfig(targets=r".*(query|value)/kernel", rank=2)
    jpeft.save(tmp_path, _trained(params, config), config, target_modules=["query", "value"])
    cfg, _ = _read_files(tmp_path)
    assert cfg["target_modules"] == ["query", "value"]
    jpeft.save(tmp_path, _trained(params, config), config, target_modules=r".*\.(query|value)")
    jpeft.save(tmp_path, _trained(params, config), config, task_type="CAUSAL_LM")
    assert _read_files(tmp_path)[0]["task_type"] == "CAUSAL_LM"


# ---- errors when saving ----


def _stacked():
    params = {"layers": {"kernel": np.zeros((3, 6, 5), np.float32)}}
    config = LoraConfig(targets="layers/kernel", rank=2, layouts={"layers/kernel": "sio"})
    return _trained(params, config), config


def test_save_refuses_stacked_adapters(tmp_path):
    adapters, config = _stacked()
    with pytest.raises(PeftFormatError, match=r"layers/kernel: .*\(3, 6, 2\).*'sio'.*1 stack axes"):
        jpeft.save(tmp_path, adapters, config)


def test_save_refuses_multi_axis_kernels(tmp_path):
    params = {"q": {"kernel": np.zeros((8, 2, 4), np.float32)}}
    config = LoraConfig(targets="q/kernel", rank=2, layouts={"q/kernel": "ioo"})
    with pytest.raises(PeftFormatError, match=r"q/kernel: .*'ioo'.*multi-axis.*pass flatten=True"):
        jpeft.save(tmp_path, _trained(params, config), config)


def test_save_refuses_unmappable_paths(tmp_path):
    params = {"w": np.zeros((4, 3), np.float32)}
    config = LoraConfig(targets="w", rank=2)
    with pytest.raises(
        PeftFormatError, match=r"w: the default path_to_module .*pass path_to_module="
    ):
        jpeft.save(tmp_path, _trained(params, config), config)
    with pytest.raises(PeftFormatError, match=r"returned 'base_model.model.w'; expected"):
        jpeft.save(
            tmp_path,
            _trained(params, config),
            config,
            path_to_module=lambda p: "base_model.model.w",
        )


def test_save_refuses_two_paths_on_one_module(tmp_path):
    params = transformer_params()
    config = LoraConfig(targets=r".*query/kernel", rank=2)
    with pytest.raises(
        PeftFormatError, match=r"layers_1/attn/query/kernel and layers_0/.* both map to"
    ):
        jpeft.save(tmp_path, _trained(params, config), config, path_to_module=lambda p: "q")


def test_save_refuses_a_config_that_changes_the_scale(tmp_path):
    params = transformer_params()
    adapters = _trained(params)
    other = LoraConfig(**{**CONFIG.to_dict(), "alpha": 7})
    with pytest.raises(
        PeftFormatError, match=r"embed/embedding: adapter scale 2.0 is not .* 7.0 / 3"
    ):
        jpeft.save(tmp_path, adapters, other)


def test_save_refuses_target_modules_that_miss_an_adapter(tmp_path):
    params = transformer_params()
    config = LoraConfig(targets=r".*(query|value)/kernel", rank=2)
    with pytest.raises(PeftFormatError, match=r"does not select module 'layers_0.attn.value'"):
        jpeft.save(tmp_path, _trained(params, config), config, target_modules=["query"])


def test_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    params = transformer_params()
    jpeft.save(tmp_path, _trained(params), CONFIG)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    adapters, config = _stacked()
    with pytest.raises(PeftFormatError):
        jpeft.save(tmp_path, adapters, config)

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(jlora.peft._file_writes, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        jpeft.save(tmp_path, _trained(params, seed=2), CONFIG)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


# ---- errors when loading ----


def _saved(tmp_path):
    params = transformer_params()
    jpeft.save(tmp_path, _trained(params), CONFIG)
    return params


def _edit_config(directory, **changes):
    file = os.path.join(directory, "adapter_config.json")
    with open(file) as fh:
        cfg = json.load(fh)
    with open(file, "w") as fh:
        json.dump({**cfg, **changes}, fh)
    # As if PEFT had written the tensors: no jlora digests binding them to the old config.
    weights = os.path.join(directory, "adapter_model.safetensors")
    save_file(load_file(weights), weights, metadata={"format": "pt"})


def test_load_names_missing_files(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"adapter_config.json: no such file; expected a PEFT"
    ):
        jpeft.load(tmp_path / "nowhere", {})
    params = _saved(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        FileNotFoundError, match=r"adapter_model.safetensors: no such file; expected"
    ):
        jpeft.load(tmp_path, params)
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pickled adapter_model.bin"):
        jpeft.load(tmp_path, params)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": "IA3"}, r"peft_type is 'IA3'; expected 'LORA'"),
        ({"use_dora": True}, r"use_dora is true: a DoRA adapter .* jlora\.peft\.load_dora"),
        (
            {"modules_to_save": ["lm_head"]},
            r"modules_to_save lists 'lm_head' but the file holds no",
        ),
        ({"bias": "all"}, r"bias = 'all' is not supported"),
        ({"r": "4"}, r"'r' is '4'; expected int"),
        ({"rank_pattern": {"embed": 2.5}}, r"'rank_pattern' is .*; expected a dict .* to integer"),
        ({"r": 5}, r"layers_0.attn.key: the tensors have rank 4 but .* rank 5"),
    ],
)
def test_load_rejects_configs_it_cannot_honour(tmp_path, changes, match):
    params = _saved(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(PeftFormatError, match=match):
        jpeft.load(tmp_path, params)


def test_load_rejects_invalid_json(tmp_path):
    params = _saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(PeftFormatError, match=r"adapter_config.json: not valid JSON"):
        jpeft.load(tmp_path, params)


def test_load_warns_about_unknown_config_keys(tmp_path):
    params = _saved(tmp_path)
    _edit_config(tmp_path, future_option=1, megatron_core="megatron.core")
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['future_option'\]"):
        adapters, _ = jpeft.load(tmp_path, params)
    np.testing.assert_array_equal(
        adapters["embed"]["embedding"].b, _trained(params)["embed"]["embedding"].b
    )


def test_load_rejects_adapters_for_another_model(tmp_path):
    _saved(tmp_path)
    wider = transformer_params(d_model=24)
    with pytest.raises(
        AdapterMismatchError,
        match=r"embed/embedding \(torch module embed\): PEFT factors lora_embedding_A \(3, 11\), "
        r"lora_embedding_B \(16, 3\) do not fit the weight of shape \(11, 24\); expected "
        r"lora_embedding_A \(3, 11\) and lora_embedding_B \(24, 3\)",
    ):
        jpeft.load(tmp_path, wider)
    shallow = transformer_params(layers=1)
    with pytest.raises(
        AdapterMismatchError,
        match=r"layers_1/attn/key/kernel: .*'layers_1.attn.key'.* Closest paths: \['layers_0/attn/key/kernel'",
    ):
        jpeft.load(tmp_path, shallow)
    stacked = {**transformer_params(), "embed": {"embedding": np.zeros((2, 11, 16), np.float32)}}
    with pytest.raises(AdapterMismatchError, match=r"weight has shape \(2, 11, 16\) but .* 2-D"):
        jpeft.load(tmp_path, stacked)


def test_load_rejects_tensors_that_are_not_lora_pairs(tmp_path):
    params = transformer_params(d_model=16, d_ff=32)
    tensors = _peft_tensors(np.float32)
    extra = {**tensors, "base_model.model.layers_0.mlp.up.lora_B.bias": np.zeros(32, np.float32)}
    _write_peft(tmp_path, _PEFT_CFG, extra)
    with pytest.raises(PeftFormatError, match=r"tensor '.*up.lora_B.bias' is not a LoRA factor"):
        jpeft.load(tmp_path, params)
    del tensors["base_model.model.layers_1.mlp.down.lora_B.weight"]
    _write_peft(tmp_path, _PEFT_CFG, tensors)
    with pytest.raises(PeftFormatError, match=r"'layers_1.mlp.down' has no lora_B.weight tensor"):
        jpeft.load(tmp_path, params)
    conv = {
        "base_model.model.conv.lora_A.weight": np.zeros((2, 3, 3, 3), np.float32),
        "base_model.model.conv.lora_B.weight": np.zeros((4, 2, 1, 1), np.float32),
    }
    _write_peft(tmp_path, _PEFT_CFG, conv)
    with pytest.raises(PeftFormatError, match=r"'conv' has factors .*Conv-layer adapters"):
        jpeft.load(tmp_path, params)
