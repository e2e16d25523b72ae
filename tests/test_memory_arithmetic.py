"""benchmarks/memory_arithmetic.py counts what it says, and docs/scaling.md shows its output."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_arithmetic as ma  # noqa: E402

GIB = 2**30


def test_parameter_counts_are_llama_2s():
    seven, seventy = ma.MODELS
    assert seven.params() == 6_738_415_616  # Llama-2-7B, as published
    assert seventy.params() == 68_976_648_192  # Llama-2-70B
    # Rank 16 on all seven projections: 32 layers x 16 x (4 x 8192 + 3 x (4096 + 11008)).
    assert seven.lora_params() == 32 * 16 * (4 * 8192 + 3 * 15104) == 39_976_960


def test_per_device_bytes_by_hand():
    seven = ma.MODELS[0]
    p = seven.params()
    # Full fine-tuning on one device: 16 bytes per parameter plus activations.
    full = ma.per_device(seven, 1, 1, "full")
    assert full["weights"] == 2 * p and full["gradients"] == 2 * p and full["optimizer"] == 12 * p
    # Activations: 32 bf16 block inputs, one block's working set, f32 logits and gradient.
    s, h, f = 4096, 4096, 11008
    want = 32 * s * h * 2 + s * 2 * (4 * h + 2 * h + 2 * h + 3 * f) + s * 32000 * 8
    assert full["activations"] == want
    # LoRA on a (8 x 8) mesh: the frozen base sharded 64 ways plus one gathered layer, and the
    # factors split as jlora's specs split them.
    lora = ma.per_device(seven, 8, 8, "lora")
    factors = 16 * 32 * 16 * (4 * (4096 / 8 + 4096 / 8) + 3 * (4096 / 8 + 11008 / 8))
    assert ma.factor_bytes_per_device(seven, 8, 8) == pytest.approx(factors)
    assert lora["weights"] == pytest.approx(2 * p / 64 + 2 * seven.layer_params() / 8 + factors / 4)
    assert lora["gradients"] + lora["optimizer"] == pytest.approx(3 * factors / 4)
    assert lora["total"] == pytest.approx(sum(v for k, v in lora.items() if k != "total"))


def test_docs_show_the_scripts_output():
    page = (ROOT / "docs" / "scaling.md").read_text()
    assert ma.table() in page
    assert ma.summary() in page
