"""The main job (examples/digits.py) learns the new digits and its merged model agrees."""

import pathlib
import re
import runpy
import sys

import jax
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
