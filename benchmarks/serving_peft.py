"""Hugging Face PEFT's mixed-adapter batch (``adapter_names=``), timed in ``serving.py``'s rounds.

``serving.py`` starts this when torch and peft import (the ``bench`` extra; run it with such a
Python, e.g. ``.venv-bench/bin/python benchmarks/serving.py``). One torch subprocess (this file run
as a script, never by hand) holds the torch twin of the benchmark decoder (``decoder_torch.py``,
the Linen weights copied in) with N adapters loaded as a PEFT user loads them: jlora's adapters
written by ``jlora.peft.save``, one directory each, the first opened with
``PeftModel.from_pretrained`` and the others added with ``load_adapter``. Its cases, one forward
of the same batch each (``torch.inference_mode``, ``eval()``, ``torch.set_num_threads(1)``):

* ``torch base``: the torch decoder alone, a second copy never wrapped by PEFT (not
  ``disable_adapter()``, which toggles every adapter of every layer on the way in and out: with 64
  loaded that costs more than the forward's LoRA terms);
* ``PEFT one adapter``: ``set_adapter("a0")`` and a plain forward (PEFT's single-adapter batch);
* ``PEFT mixed N=..``: ``forward(tokens, adapter_names=[...])`` with jlora's random assignment for
  that N: every LoRA layer runs the base once, then loops in Python over the adapters present,
  indexing its sub-batch out and adding the term back.

The worker times each call with its own CPU clock (``time.process_time``, as ``timing.py``) and
answers over a pipe, so the torch calls share the rounds, and the machine's load, with jlora's.
Before timing, :meth:`PeftWorker.outputs` returns its mixed-batch logits, which ``serving.py``
compares with jlora's gather forward on the same assignment (the same function).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).parent


def available() -> str | None:
    """None if torch and peft import here, else why the PEFT cases are skipped."""
    missing = [m for m in ("torch", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"PEFT mixed batch skipped: {' and '.join(missing)} not installed in {sys.executable};"
            " run with a Python that has the bench extra (pip install -e '.[bench]')"
        )
    return None


def torch_module(path: str) -> str:
    """Linen path -> torch module name: ``layers_0/query/kernel`` -> ``layers.0.query``."""
    return path.removesuffix("/kernel").replace("layers_", "layers.").replace("/", ".")


class PeftWorker:
    """The torch subprocess: the decoder, ``adapters`` loaded in PEFT, the ids for each N."""

    def __init__(self, params, adapters, config, tokens, size, assignments: dict[int, np.ndarray]):
        import jlora.peft
        from jlora._paths import leaves_with_paths

        workdir = pathlib.Path(tempfile.mkdtemp(prefix="jlora-serving-peft-"))
        flat = {path: np.asarray(leaf) for path, leaf in leaves_with_paths(params)}
        flat["__tokens__"] = np.asarray(tokens)
        np.savez(workdir / "weights.npz", **flat)
        dirs = []
        for i, adapter in enumerate(adapters):
            dirs.append(str(workdir / f"a{i}"))
            jlora.peft.save(dirs[-1], adapter, config, path_to_module=torch_module)
        spec = {
            "size": {
                "vocab": size.vocab,
                "d_model": size.d_model,
                "heads": size.heads,
                "layers": size.layers,
            },
            "adapters": dirs,
            "assignments": {str(n): [int(i) for i in ids] for n, ids in assignments.items()},
            "outputs": str(workdir / "outputs.npz"),
        }
        (workdir / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "serving_peft.py"),
                str(workdir / "weights.npz"),
                str(workdir / "spec.json"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
            env=env,
        )
        ready = self.read()
        self.versions = f"torch {ready['torch']}, peft {ready['peft']}"
        self.output_file = spec["outputs"]
        self.workdir = workdir

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PEFT worker exited ({self.proc.wait()})")
        return json.loads(line)

    def outputs(self) -> dict[str, np.ndarray]:
        """The worker's logits, by case name: ``"PEFT one adapter"``, ``"PEFT mixed N=.."``."""
        return dict(np.load(self.output_file))

    def case(self, name: str) -> PeftCase:
        return PeftCase(name, self)

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


class PeftCase:
    """One of the worker's forwards; calling it runs one and returns (wall, cpu) seconds."""

    def __init__(self, name: str, worker: PeftWorker):
        self.name = name
        self.worker = worker

    def __call__(self) -> tuple[float, float]:
        self.worker.proc.stdin.write(f"step {self.name}\n")
        self.worker.proc.stdin.flush()
        out = self.worker.read()
        return out["wall"], out["cpu"]


def _build(weights: str, spec: dict):
    """The PeftModel with every adapter loaded, and its forward for each case name."""
    import peft
    import torch
    from decoder_torch import Decoder, load_linen_params

    flat = dict(np.load(weights))
    size = spec["size"]
    base = Decoder(size["vocab"], size["d_model"], size["heads"], size["layers"])
    load_linen_params(base, flat)
    plain = Decoder(size["vocab"], size["d_model"], size["heads"], size["layers"]).eval()
    load_linen_params(plain, flat)
    tokens = torch.from_numpy(flat["__tokens__"]).long()
    first, *rest = spec["adapters"]
    model = peft.PeftModel.from_pretrained(base, first, adapter_name="a0")
    for i, directory in enumerate(rest, start=1):
        model.load_adapter(directory, adapter_name=f"a{i}")
    model.eval()
    model.set_adapter("a0")

    forwards = {"torch base": lambda: plain(tokens), "PEFT one adapter": lambda: model(tokens)}
    for n, ids in spec["assignments"].items():
        names = [f"a{i}" for i in ids]
        forwards[f"PEFT mixed N={n}"] = lambda names=names: model(tokens, adapter_names=names)
    return forwards


def main() -> None:
    import peft
    import torch

    weights, spec = sys.argv[1], json.loads(pathlib.Path(sys.argv[2]).read_text())
    torch.set_num_threads(1)
    with torch.inference_mode():
        forwards = _build(weights, spec)
        outputs = {name: forwards[name]().numpy() for name in forwards if "base" not in name}
        np.savez(spec["outputs"], **outputs)
        print(json.dumps({"torch": torch.__version__, "peft": peft.__version__}), flush=True)
        for line in sys.stdin:
            command, _, name = line.strip().partition(" ")
            if command == "quit":
                break
            wall, cpu = time.perf_counter(), time.process_time()
            forwards[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


if __name__ == "__main__":
    main()
