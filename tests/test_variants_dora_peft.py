"""PEFT DoRA files (use_dora): names, shapes, and PEFT's DoRA forward in float64 against jlora."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_linen import MLP
from safetensors.numpy import load_file, save_file

import jlora
import jlora.linen
import jlora.peft
from jlora.variants import dora_magnitudes

RANK, ALPHA = 3, 6.0


def _trained(seed=0):
    """An MLP with DoRA adapters and magnitudes moved away from their init."""
    model = MLP()
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)
    params = model.init(jax.random.key(seed), x)["params"]
    config = jlora.LoraConfig(targets=".*kernel", rank=RANK, alpha=ALPHA)
    adapted = jlora.linen.lora(model, config)
    adapters = adapted.init_adapters(jax.random.key(seed + 1), params, x)
    adapters = jax.tree.map(
        lambda v: v + 0.2 * jnp.asarray(rng.standard_normal(v.shape), v.dtype), adapters
    )
    m = jax.tree.map(
        lambda v: v * jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype),
        dora_magnitudes(params, adapters),
    )
    return model, adapted, config, params, adapters, m, x


def _peft_dora_linear(x, weight, bias, a, b, magnitude, scaling):
    """PEFT's DoRA Linear forward (peft.tuners.lora.dora.DoraLinearLayer), in float64 NumPy:
    ``weight: (out, in)``, ``A: (r, in)``, ``B: (out, r)``, ``magnitude: (out,)``."""
    result = x @ weight.T + bias
    lora_result = (x @ a.T) @ b.T
    weight_norm = np.linalg.norm(weight + scaling * (b @ a), axis=1)
    mag_norm_scale = (magnitude / weight_norm)[None, :]
    result_dora = (mag_norm_scale - 1) * (x @ weight.T) + mag_norm_scale * lora_result * scaling
    return result + result_dora


def _peft_mlp(tensors, params, x, scaling):
    h = np.asarray(x, np.float64)
    for name in ("up", "mid", "head"):
        key = f"base_model.model.{name}"
        h = _peft_dora_linear(
            h,
            np.asarray(params[name]["kernel"], np.float64).T,
            np.asarray(params[name]["bias"], np.float64),
            tensors[f"{key}.lora_A.weight"].astype(np.float64),
            tensors[f"{key}.lora_B.weight"].astype(np.float64),
            tensors[f"{key}.lora_magnitude_vector"].astype(np.float64),
            scaling,
        )
        if name != "head":
            h = np.maximum(h, 0.0)
    return h


def test_written_file_has_peft_names_and_runs_as_peft_would(tmp_path):
    _, adapted, config, params, adapters, m, x = _trained()
    jlora.peft.save(tmp_path, adapters, config, magnitudes=m)
    data = json.loads((tmp_path / jlora.peft.CONFIG_NAME).read_text())
    assert data["use_dora"] is True and data["r"] == RANK and data["lora_alpha"] == ALPHA
    tensors = load_file(os.fspath(tmp_path / jlora.peft.WEIGHTS_NAME))
    assert sorted(k for k in tensors if "magnitude" in k) == [
        f"base_model.model.{n}.lora_magnitude_vector" for n in ("head", "mid", "up")
    ]
    for name, out in (("up", 24), ("mid", 24), ("head", 5)):
        vector = tensors[f"base_model.model.{name}.lora_magnitude_vector"]
        assert vector.shape == (out,) and vector.dtype == np.float32  # one per output feature
        np.testing.assert_array_equal(vector, np.asarray(m[name]["kernel"]))
    want = _peft_mlp(tensors, params, x, ALPHA / RANK)
    got = jax.jit(lambda a, m: adapted.apply(params, a, x, magnitudes=m))(adapters, m)
    # Three float32 layers of sums over <= 24 inputs and the rank, each rescaled by a float32
    # norm ratio, against float64: 1e-5 of the output's scale is far below any wrong term.
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_round_trip_is_exact(tmp_path):
    _, _, config, params, adapters, m, _ = _trained(1)
    jlora.peft.save(tmp_path, adapters, config, magnitudes=m)
    loaded, magnitudes, loaded_config = jlora.peft.load_dora(tmp_path, params)
    assert loaded_config.scale_for("up/kernel") == ALPHA / RANK
    for got, want in zip(jax.tree.leaves((loaded, magnitudes)), jax.tree.leaves((adapters, m))):
        np.testing.assert_array_equal(got, want)


def test_reads_a_file_written_the_way_peft_writes_it(tmp_path):
    """No jlora digests, PEFT's own config keys: what save_pretrained produces."""
    _, adapted, _, params, adapters, m, x = _trained(2)
    tensors = {}
    for name in ("up", "mid", "head"):
        f = adapters[name]["kernel"]
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(np.asarray(f.a).T)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(np.asarray(f.b).T)
        tensors[f"{key}.lora_magnitude_vector"] = np.asarray(m[name]["kernel"])
    save_file(tensors, os.fspath(tmp_path / jlora.peft.WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "use_dora": True,
              "target_modules": ["up", "mid", "head"], "task_type": None}  # fmt: skip
    (tmp_path / jlora.peft.CONFIG_NAME).write_text(json.dumps(config))
    loaded, magnitudes, _ = jlora.peft.load_dora(tmp_path, params)
    got = adapted.apply(params, loaded, x, magnitudes=magnitudes)
    want = _peft_mlp(tensors, params, x, ALPHA / RANK)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    with pytest.raises(jlora.peft.PeftFormatError, match=r"use_dora is true: a DoRA adapter"):
        jlora.peft.load(tmp_path, params)
    del tensors["base_model.model.mid.lora_magnitude_vector"]
    save_file(tensors, os.fspath(tmp_path / jlora.peft.WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(jlora.peft.PeftFormatError, match=r"module 'mid' has no lora_magnitude"):
        jlora.peft.load_dora(tmp_path, params)


def test_errors(tmp_path):
    _, _, config, params, adapters, m, _ = _trained(3)
    with pytest.raises(jlora.peft.PeftFormatError, match=r"mid/kernel: this adapter has no DoRA"):
        jlora.peft.save(tmp_path, adapters, config, magnitudes={"up": m["up"], "head": m["head"]})
    bad = {**m, "head": {"kernel": jnp.ones(4)}}
    with pytest.raises(jlora.peft.PeftFormatError, match=r"head/kernel: DoRA magnitude of shape"):
        jlora.peft.save(tmp_path, adapters, config, magnitudes=bad)
    jlora.peft.save(tmp_path, adapters, config)
    with pytest.raises(jlora.peft.PeftFormatError, match=r"use_dora is not true"):
        jlora.peft.load_dora(tmp_path, params)
