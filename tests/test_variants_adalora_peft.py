"""PEFT AdaLoRA files: triplets read into AdaloraFactors, merged as PEFT's SVDLinear in float64."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_within_roundoff, f64
from safetensors.numpy import save_file

import jlora
import jlora.peft
from jlora.variants import adalora_ranks, adalora_to_lora

INIT_R, ALPHA = 6, 8.0
KEEP = {"encoder.q": 3, "encoder.v": 0, "head": 6}  # ranks saved after pruning to rank_pattern
SHAPES = {"encoder.q": (10, 12), "encoder.v": (10, 12), "head": (12, 4)}  # (in, out)


def _write(directory, rng, **config):
    tensors, rank_pattern = {}, {}
    for module, r in KEEP.items():
        fan_in, fan_out = SHAPES[module]
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A"] = rng.standard_normal((r, fan_in)).astype(np.float32)
        tensors[f"{key}.lora_B"] = rng.standard_normal((fan_out, r)).astype(np.float32)
        tensors[f"{key}.lora_E"] = rng.standard_normal((r, 1)).astype(np.float32)
        rank_pattern[f"{module}.lora_E"] = [True] * r + [False] * (INIT_R - r)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), {"format": "pt"})
    data = {"peft_type": "ADALORA", "init_r": INIT_R, "target_r": 3, "lora_alpha": ALPHA,
            "r": 8, "rank_pattern": rank_pattern, "target_modules": ["q", "v", "head"],
            "bias": "none", "task_type": None, **config}  # fmt: skip
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(data, f)
    return tensors


def _params(rng):
    tree = {}
    for module, (fan_in, fan_out) in SHAPES.items():
        node = tree
        for key in module.split("."):
            node = node.setdefault(key, {})
        node["kernel"] = jnp.asarray(rng.standard_normal((fan_in, fan_out)), jnp.float32)
    return tree


def test_merge_is_peft_svdlinear_delta(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _write(tmp_path, rng)
    params = _params(rng)
    ada = jlora.peft.load_adalora(tmp_path, params)
    assert adalora_ranks(ada) == {"encoder/q/kernel": 3, "head/kernel": 6}  # v kept none
    merged = jlora.merge(params, adalora_to_lora(ada))
    for module in ("encoder.q", "head"):
        key = f"base_model.model.{module}"
        a, b, e = (f64(tensors[f"{key}.{n}"]) for n in ("lora_A", "lora_B", "lora_E"))
        # PEFT: W (out, in) += B (A * E) * scaling / (ranknum + 1e-5), ranknum = init_r.
        delta_torch = b @ (a * e) * ALPHA / (INIT_R + 1e-5)
        path = module.split(".")
        w = f64(params[path[0]][path[1]]["kernel"] if len(path) == 2 else params[path[0]]["kernel"])
        got = merged[path[0]][path[1]]["kernel"] if len(path) == 2 else merged[path[0]]["kernel"]
        magnitude = np.abs(w) + (np.abs(b) @ np.abs(a * e)).T * ALPHA / INIT_R
        assert_within_roundoff(got, w + delta_torch.T, magnitude, terms=KEEP[module] + 4)
    v = params["encoder"]["v"]["kernel"]
    np.testing.assert_array_equal(merged["encoder"]["v"]["kernel"], v)


def test_errors(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path, rng)
    params = _params(rng)
    with pytest.raises(jlora.AdapterMismatchError, match=r"head/kernel: the AdaLoRA triplets"):
        jlora.peft.load_adalora(tmp_path, {**params, "head": {"kernel": jnp.zeros((4, 12))}})
    _write(tmp_path, rng, bias="all")
    with pytest.raises(jlora.peft.PeftFormatError, match=r"bias = 'all'"):
        jlora.peft.load_adalora(tmp_path, params)
    _write(tmp_path, rng, peft_type="LORA")
    with pytest.raises(jlora.peft.PeftFormatError, match=r"peft_type is 'LORA'; expected 'ADA"):
        jlora.peft.load_adalora(tmp_path, params)
