"""examples/serving_decode.py: cached greedy decoding of a batch mixing adapters from one bank."""

import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import serving_decode as sd  # noqa: E402

TINY = sd.Size(vocab=24, d_model=16, heads=2, layers=1, prompt=3, steps=4, adapters=4, base_rows=2)


@pytest.mark.slow  # ~10 s; the mixed forward of tests/test_serving.py is in the fast set
def test_each_row_decodes_as_its_adapter_alone_in_one_compiled_step():
    model, params, adapters, bank, prompts, names = sd.setup(TINY)
    traces = []
    step = sd.mixed_step(model, traces)
    mixed = sd.generate(step, (params, bank.factors, bank.ids(names)), prompts, TINY)
    assert mixed.shape == (6, 4)
    assert traces == [(6, 3), (6, 1)]  # the prompt, then one program for every decode step
    alone = sd.one_by_one(model, params, adapters, prompts, names, TINY)
    np.testing.assert_array_equal(mixed, alone)
    # Each row's factors gathered once for the whole sequence: the same tokens.
    rows = sd.gather(bank.factors, bank.ids(names))
    np.testing.assert_array_equal(
        sd.generate(sd.gathered_step(model), (params, rows), prompts, TINY), alone
    )
    # The same rows with the base: the adapters change the tokens.
    base = sd.generate(sd.plain_step(model), (params,), prompts, TINY)
    assert any((base[e] != mixed[e]).any() for e, n in enumerate(names) if n is not None)
    # Hot swap: another adapter in slot 0, other ids; still the same two programs.
    swapped = bank.put(0, adapters[names[-1] or "task1"], name="again")
    sd.generate(step, (params, swapped.factors, swapped.ids(["again"] * 6)), prompts, TINY)
    assert len(traces) == 2


@pytest.mark.slow
def test_the_example_runs():
    result = sd.main(["--no-timing"])
    assert (
        result["equal"]
        and result["gathered_once_equal"]
        and result["distinct"] == 20
        and len(result["traces"]) == 2
    )
