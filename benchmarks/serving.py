"""Mixed-adapter batches (``jlora.serving``) against the base forward and one adapter per call.

``.venv-bench/bin/python benchmarks/serving.py --steps 15 --out benchmarks/results/serving-cpu.md``
(any Python with jlora; the PEFT cases need the ``bench`` extra) times, on the benchmark decoder
(pinned to one core; CPU time, interleaved rounds, see timing.py), the forward pass of one batch:

* ``base``: the frozen model alone;
* ``one adapter``: ``jlora.linen`` with one adapter for the whole batch (the single-adapter cost);
* ``mixed N=.., <strategy>``: ``jlora.serving.apply`` with a bank of N adapters, the examples
  assigned at random, for each strategy (gather, segment, onehot);
* ``separate N=..``: the batch split by adapter, one jitted single-adapter forward per sub-batch
  (what a server without mixed batches does; PEFT's ``adapter_names=`` loops the same way);
* ``torch base`` / ``PEFT one adapter`` / ``PEFT mixed N=..``: Hugging Face PEFT on the torch twin of
  the decoder, the same weights, adapters, batch and assignments (``serving_peft.py``: a torch
  subprocess whose calls are timed in the same rounds, one thread), when torch and peft import
  (``.venv-bench/bin/python benchmarks/serving.py``; ``--no-peft`` to leave it out). Its mixed
  logits are checked against jlora's gather forward before timing.

Ratios are to ``base`` and to ``one adapter``. In the same run, **decode steps** (one new token per
row against a KV cache, ``examples/serving_decode.py``'s decoder at the same width and depth, the
cache ``--prompt + --new`` long and half full) for the same N and batch:

* ``decode base`` / ``decode one adapter`` (factored, jlora.linen): the single-adapter step;
* ``decode N=.., gather`` / ``onehot``: the mixed step, gathering each row's factors per layer;
* ``decode N=.., pre-gathered``: the rows' factors gathered once per sequence outside the step
  (``jlora.serving.gather``, the ids do not change while decoding) and passed with ``ids=None``.

And **memory per adapter**: the bank's bytes against N (N times one adapter's padded factor bytes,
plus N float32 scales per path), and XLA's memory account (``compiled.memory_analysis()``) of the
mixed forward and decode step for each N.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import serving_peft  # noqa: E402
from decoder import Decoder, Size  # noqa: E402
from timing import JaxCase, run_rounds  # noqa: E402

import jlora  # noqa: E402
import jlora.linen  # noqa: E402
from jlora.serving import STRATEGIES, AdapterBank, apply, gather  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import serving_decode  # noqa: E402

TARGETS = ".*(query|key|value|out|up|down)/kernel"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class SeparateCase:
    """One jitted single-adapter forward per adapter present, each on its own sub-batch."""

    def __init__(self, name, forward, params, adapters, tokens, ids):
        self.name = name
        self.calls = []
        for n in np.unique(ids):
            sub = tokens[np.flatnonzero(ids == n)]
            compiled = forward.lower(params, adapters[int(n)], sub).compile()
            self.calls.append((compiled, (params, adapters[int(n)], sub)))

    def __call__(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready([c(*args) for c, args in self.calls])
        return time.perf_counter() - wall, time.process_time() - cpu


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def xla_memory(case: JaxCase) -> tuple[int, int, int]:
    """(argument, temporary, output) bytes of a compiled case, XLA's account."""
    m = case.compiled.memory_analysis()
    return m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes


def decode_cases(args, size: Size, adapters_of, rng) -> tuple[list, dict]:
    """The decode-step cases and, per N, the bank's bytes; ``adapters_of(model, params)``."""
    dsize = serving_decode.Size(
        vocab=size.vocab,
        d_model=size.d_model,
        heads=size.heads,
        layers=size.layers,
        prompt=args.prompt,
        steps=args.new,
    )
    model = serving_decode.Decoder(dsize)
    prompts = jnp.asarray(rng.integers(0, size.vocab, (size.batch, dsize.prompt)), jnp.int32)
    cache = serving_decode.init_cache(dsize, size.batch)
    one = serving_decode.init_cache(dsize, 1)
    params = jax.jit(model.init)(jax.random.key(0), prompts[:1], one, 0)["params"]
    lora = jlora.linen.lora(model, jlora.LoraConfig(targets=TARGETS, rank=args.rank, alpha=16.0))
    template = lora.init_adapters(jax.random.key(1), params, prompts[:1], one, 0)
    adapters = adapters_of(template)
    # A cache filled by the prompt plus half the new tokens: the step attends over a real cache.
    prefill = serving_decode.plain_step(model)
    token, cache = prefill(params, prompts, cache, jnp.int32(0))
    token, index = token[:, None], jnp.int32(dsize.prompt + args.new // 2)
    step = serving_decode.decoder_step(lambda p, a, *xs: lora.apply(p, a, *xs))
    cases = [
        JaxCase("decode base", prefill, (params, token, cache, index), carry=0, loss_index=None),
        JaxCase(
            "decode one adapter",
            step,
            (params, adapters[0], token, cache, index),
            carry=0,
            loss_index=None,
        ),
    ]
    banks = {}
    for n in args.adapters:
        bank = AdapterBank.build(
            params, {f"a{i}": adapters[i] for i in range(n)}, capacity=n, max_rank=args.rank
        )
        banks[n] = nbytes(bank.factors)
        ids = jnp.asarray(rng.integers(0, n, size.batch), jnp.int32)
        for strategy in ("gather", "onehot"):
            mixed = serving_decode.mixed_step(model, strategy=strategy)
            case_args = (params, bank.factors, ids, token, cache, index)
            cases.append(JaxCase(f"decode N={n}, {strategy}", mixed, case_args, carry=0,
                                 loss_index=None))  # fmt: skip
        rows = jax.jit(gather)(bank.factors, ids)  # once per sequence, outside the step
        pre = serving_decode.decoder_step(lambda p, f, *xs: apply(model, p, f, None, *xs))
        cases.append(
            JaxCase(
                f"decode N={n}, pre-gathered",
                pre,
                (params, rows, token, cache, index),
                carry=0,
                loss_index=None,
            )
        )
    return cases, {"bank bytes": banks, "adapter bytes": nbytes(adapters[0])}


def table(rows, by_name, base: str, one: str) -> list[str]:
    lines = [f"| case | ms | x {base} | x {one} |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {1e3 * r.cpu:.2f} | {r.cpu / by_name[base]:.2f} | "
            f"{r.cpu / by_name[one]:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="decode: new tokens (cache size)")
    parser.add_argument("--parts", nargs="+", default=["forward", "decode"])
    parser.add_argument("--no-peft", action="store_true", help="leave out PEFT's mixed batch")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    size = Size(
        vocab=512, d_model=args.d_model, heads=4, layers=args.layers, seq=args.seq, batch=args.batch
    )
    model = Decoder(size)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, size.vocab, (size.batch, size.seq)), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    config = jlora.LoraConfig(targets=TARGETS, rank=args.rank, alpha=16.0)
    lora = jlora.linen.lora(model, config)
    template = lora.init_adapters(jax.random.key(1), params, tokens)
    n_max = max(args.adapters)

    def adapters_of(template):
        # b != 0: every adapter does real work. Random perturbations, not a constant per adapter:
        # adding 0.01 * (i + 1) to every entry grew the activations with i until, near i = 64,
        # LayerNorm's variance lost all precision (logits of 1e4 that PEFT's torch twin did not
        # reproduce); these keep every adapter's term the size of the base's.
        leaves, treedef = jax.tree.flatten(template)
        out = []
        for i in range(n_max):
            keys = jax.random.split(jax.random.key(100 + i), len(leaves))
            noise = [
                0.02 * jax.random.normal(k, x.shape, x.dtype)
                for k, x in zip(keys, leaves, strict=True)
            ]
            out.append(
                jax.tree.unflatten(treedef, [x + e for x, e in zip(leaves, noise, strict=True)])
            )
        return out

    adapters = adapters_of(template)
    base = jax.jit(lambda p, t: model.apply({"params": p}, t))
    single = jax.jit(lambda p, a, t: lora.apply(p, a, t))
    cases, memory, banks, assignments = [], {}, {}, {}
    if "forward" in args.parts:
        cases += [
            JaxCase("base", base, (params, tokens), carry=0, loss_index=None),
            JaxCase("one adapter", single, (params, adapters[0], tokens), carry=0, loss_index=None),
        ]
    for n in args.adapters if "forward" in args.parts else ():
        bank = AdapterBank.build(
            params, {f"a{i}": adapters[i] for i in range(n)}, capacity=n, max_rank=args.rank
        )
        banks[n] = nbytes(bank.factors)
        ids = jnp.asarray(rng.integers(0, n, size.batch), jnp.int32)
        assignments[n] = np.asarray(ids)
        for strategy in STRATEGIES:
            mixed = jax.jit(lambda p, f, i, t, s=strategy: apply(model, p, f, i, t, strategy=s))
            cases.append(
                JaxCase(
                    f"mixed N={n}, {strategy}",
                    mixed,
                    (params, bank.factors, ids, tokens),
                    carry=0,
                    loss_index=None,
                )
            )
        if n > 1:
            cases.append(
                SeparateCase(f"separate N={n}", single, params, adapters, tokens, np.asarray(ids))
            )
    peft_lines, worker = [], None
    skipped = "PEFT left out (--no-peft)" if args.no_peft else serving_peft.available()
    if "forward" in args.parts and skipped is None:
        worker = serving_peft.PeftWorker(params, adapters, config, tokens, size, assignments)
        peft_lines = peft_check(worker, cases, single(params, adapters[0], tokens), assignments)
    elif skipped:
        log(skipped)
    if "decode" in args.parts:
        more, memory = decode_cases(args, size, adapters_of, rng)
        cases += more
    if worker is not None:
        # Last in each round: the first JAX call after the torch process ran finds the caches
        # cold, which a 40 ms forward absorbs but a 3 ms decode step does not.
        cases += [worker.case("torch base"), worker.case("PEFT one adapter")]
        cases += [worker.case(f"PEFT mixed N={n}") for n in args.adapters]
    log(f"{len(cases)} cases compiled; timing {args.steps} rounds")
    rows = run_rounds(cases, steps=args.steps, warmup=1, log=log)
    if worker is not None:
        worker.close()
    by_name = {r.name: r.cpu for r in rows}
    lines = [
        f"Decoder d_model={size.d_model}, layers={size.layers}, seq={size.seq}, "
        f"batch={size.batch}, rank {args.rank} on {TARGETS}; jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, 1 core, median CPU time of {args.steps} rounds",
    ]
    forward = [r for r in rows if not r.name.startswith(("decode", "torch", "PEFT"))]
    decode = [r for r in rows if r.name.startswith("decode")]
    peft = [r for r in rows if r.name.startswith(("torch", "PEFT"))]
    if forward:
        lines += ["", "Forward, one batch:", "", *table(forward, by_name, "base", "one adapter")]
    if peft:
        lines += [
            "",
            f"Hugging Face PEFT ({worker.versions}, torch.set_num_threads(1)), the same forward "
            "in the same rounds: the torch twin of the decoder with the same weights, adapters "
            "(jlora.peft.save, then PeftModel.from_pretrained and load_adapter), batch and "
            "assignments; `adapter_names=` for the mixed batch:",
            "",
            *table(peft, by_name, "torch base", "PEFT one adapter"),
            "",
            *peft_lines,
            "",
            "Each library's mixed batch against its own one-adapter batch, same run:",
            "",
            *ratio_table(by_name, args.adapters),
        ]
    if decode:
        lines += [
            "",
            f"Decode step, one token per row, KV cache of {args.prompt + args.new} "
            f"(position {args.prompt + args.new // 2}):",
            "",
            *table(decode, by_name, "decode base", "decode one adapter"),
        ]
    lines += ["", *memory_lines(cases, banks, memory)]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


def peft_check(worker, cases, one, assignments) -> list[str]:
    """PEFT's logits against jlora's (one adapter; gather forward for each N), relative to the largest."""
    theirs = worker.outputs()
    ours = {"PEFT one adapter": np.asarray(one)}
    for case in cases:
        if isinstance(case, JaxCase) and case.name.endswith(", gather"):
            n = case.name.removeprefix("mixed N=").removesuffix(", gather")
            ours[f"PEFT mixed N={n}"] = np.asarray(case.compiled(*case.args))
    diffs = {
        name.removeprefix("PEFT "): (np.max(np.abs(theirs[name] - x)), np.max(np.abs(x)))
        for name, x in ours.items()
    }
    log(f"PEFT against jlora, (max |logit difference|, max |logit|): {diffs}")
    listed = ", ".join(f"{name} {d / m:.1e} (of {m:.1f})" for name, (d, m) in diffs.items())
    return [
        "PEFT's logits against jlora's (one adapter; gather forward for N = "
        f"{', '.join(map(str, assignments))}), max |difference| / max |logit|: {listed}."
    ]


def ratio_table(by_name: dict, ns: list[int]) -> list[str]:
    """Per N: jlora gather, jlora separate calls and PEFT mixed, each / its one-adapter batch."""
    lines = [
        "| N | jlora gather / jlora one adapter | jlora separate calls / one adapter "
        "| PEFT mixed / PEFT one adapter | PEFT mixed / jlora gather |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        gather, peft = by_name[f"mixed N={n}, gather"], by_name[f"PEFT mixed N={n}"]
        separate = by_name.get(f"separate N={n}")
        sep = f"{separate / by_name['one adapter']:.2f}" if separate else "-"
        lines.append(
            f"| {n} | {gather / by_name['one adapter']:.2f} | {sep} | "
            f"{peft / by_name['PEFT one adapter']:.2f} | {peft / gather:.2f} |"
        )
    return lines


def memory_lines(cases, banks: dict, decode: dict) -> list[str]:
    """Bank bytes against N, and XLA's memory account of every compiled case."""
    lines = ["Memory: bank bytes against N (the adapters' padded factors plus N float32 scales "
             "per path) and XLA's account of each compiled program (MiB):", ""]  # fmt: skip
    for label, per_n, one in (
        ("forward", banks, None),
        ("decode", decode.get("bank bytes", {}), decode.get("adapter bytes")),
    ):
        for n, b in per_n.items():
            extra = f", {b / n:,.0f} per adapter" + (
                f" (one adapter's factors: {one:,})" if one else ""
            )
            lines.append(f"- {label} bank N={n}: {b:,} bytes{extra}")
    lines += ["", "| program | arguments | temporaries | outputs |", "|---|---:|---:|---:|"]
    mib = 2.0**20
    for case in cases:
        if isinstance(case, JaxCase):
            arg, tmp, out = xla_memory(case)
            lines.append(f"| {case.name} | {arg / mib:.2f} | {tmp / mib:.2f} | {out / mib:.2f} |")
    return lines


if __name__ == "__main__":
    main()
