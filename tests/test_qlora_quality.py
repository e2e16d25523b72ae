"""examples/qlora_quality.py: its stores and statistics (fast), and its --quick run (slow)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jlora.quant as jq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import qlora_quality as qq  # noqa: E402


def _params():
    rng = np.random.default_rng(0)
    return {
        "hidden_0": {
            "kernel": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(128), jnp.float32),
        },
        "head": {"kernel": jnp.asarray(rng.standard_normal((128, 10)), jnp.float32)},
    }


@pytest.mark.parametrize("kind", qq.STORES)
def test_stores_change_only_the_frozen_kernels(kind):
    params = _params()
    stored = qq.store(params, qq.MLP_FROZEN, kind)
    assert stored["hidden_0"]["bias"] is params["hidden_0"]["bias"]
    assert stored["head"]["kernel"] is params["head"]["kernel"]
    w = np.asarray(params["hidden_0"]["kernel"], np.float64)
    got = stored["hidden_0"]["kernel"]
    if kind == "float32":
        assert got is params["hidden_0"]["kernel"]
    elif kind == "bfloat16":
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), w.astype(jnp.bfloat16))
    elif kind in ("nf4", "int8"):
        assert isinstance(got, jq.QuantizedWeight) and got.kind == kind
        assert got.double_quant == (kind == "nf4")
        assert kind == "int8" or got.block_size == 64
    else:  # NF4's values in a float32 kernel, exactly
        assert got.dtype == jnp.float32
        nf4 = qq.store(params, qq.MLP_FROZEN, "nf4")["hidden_0"]["kernel"]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jq.dequantize(nf4)))
        assert 0 < np.abs(np.asarray(got, np.float64) - w).max() < 0.2 * np.abs(w).max()


def test_frozen_fraction_counts_the_stored_kernels():
    assert qq.frozen_fraction(_params(), qq.MLP_FROZEN) == 64 * 128 / (64 * 128 + 128 + 1280)


def test_cell_is_the_mean_t_interval_and_range_clipped_to_bounds():
    values = [0.90, 0.95, 1.00]
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert qq.cell(values) == f"95.0 [{95 - 100 * half:.1f}, {95 + 100 * half:.1f}] (90.0 to 100.0)"
    assert qq.cell(values, *qq.POINTS) == f"95.0 [{95 - 100 * half:.1f}, 100.0] (90.0 to 100.0)"
    assert qq.cell([0.25], 1.0, 3) == "0.250"


def test_verdict_says_within_below_or_not_resolved():
    base = [0.90, 0.92, 0.94, 0.96, 0.98]
    runs = [
        {"bfloat16": {"m": b}, "nf4": {"m": b + d}, "int8": {"m": b + e}}
        for b, d, e in zip(base, [0.001, -0.002, 0.0, 0.002, -0.001], [-0.05, 0.04, -0.1, 0.0, 0.02],
                           strict=True)
    ]  # fmt: skip
    words = qq.verdict(runs, "m")
    assert "nf4 - bfloat16 +0.00 [-0.20, +0.20] (within 1 point" in words
    assert "int8 - bfloat16 -1.80 [" in words and "not resolved at this scale" in words
    low = [{"bfloat16": {"m": b}, "nf4": {"m": b - 0.05}, "int8": {"m": b}} for b in base]
    assert "more than 1 point below" in qq.verdict(low, "m")


@pytest.mark.slow
def test_quick_run_adapts_every_store_and_nf4_is_its_values():
    """The --quick run (2 seeds): tolerances on the qualitative claims, no pinned numbers."""
    with jax.numpy_dtype_promotion("standard"):
        out = qq.main(["--quick"])
    reverse, digits = out["reverse"], out["digits"]
    assert len(reverse) == len(digits) == 2
    for run in reverse:
        for kind in qq.STORES:
            assert run[kind]["copy"] > 0.99, kind  # every store of the base still copies
    for kind in qq.STORES:
        # The frozen base reverses at chance (about 0.06); every store adapts far above it.
        assert np.mean([run[kind]["accuracy"] for run in reverse]) > 0.6, kind
        assert np.mean([run[kind]["accuracy"] for run in digits]) > 0.8, kind
    for run in digits:
        # int8 and bfloat16 bases keep the base's accuracy on 0-4 within 2 images of float32.
        for kind in ("bfloat16", "int8"):
            assert abs(run[kind]["old"] - run["float32"]["old"]) <= 0.0075
        # The block-wise quantised product computes NF4's values: the same training as a float32
        # base holding them, to within two test images (one in the full run).
        assert abs(run["nf4"]["accuracy"] - run["nf4 as float32"]["accuracy"]) <= 0.008
