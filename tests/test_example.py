"""The main job (examples/digits.py) learns the new digits and its merged model agrees."""

import pathlib
import re
import runpy
import sys

import jax
import numpy as np
import optax
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits.py"


@pytest.mark.slow
def test_digits_example_end_to_end(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--epochs", "15", "--workdir", str(tmp_path)])
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam under the strict test config
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"before ([\d.]+), after ([\d.]+)", out).groups())
    assert before < 0.05 and after > 0.85
    assert "identical predictions True" in out
    assert "restored exactly True; merged on disk equals in-memory merge bit for bit True" in out


def test_digits_train_leaves_the_callers_trainable_tree_valid():
    digits = runpy.run_path(str(EXAMPLE))  # not __main__: defines train, runs nothing
    x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((64, 3)), jax.numpy.float32)
    y = jax.numpy.asarray(np.random.default_rng(1).integers(0, 2, 64))
    start = {"w": jax.numpy.zeros((3, 2), jax.numpy.float32)}
    before = np.asarray(start["w"]).copy()

    def loss(trainable, frozen, xb, yb):
        logits = xb @ trainable["w"] * frozen
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam under the strict test config
        runs = [
            digits["train"]("t", loss, start, 1.0, (x, y), epochs=2, lr=0.1, seed=0)
            for _ in range(2)
        ]
    assert not start["w"].is_deleted()
    np.testing.assert_array_equal(start["w"], before)
    np.testing.assert_array_equal(runs[0]["w"], runs[1]["w"])  # same start, same seed
    assert not np.array_equal(runs[0]["w"], before)  # it trained
