"""The Hugging Face PEFT peer: PyTorch cases run in subprocesses, timed in the same rounds as JAX's.

Each case (``torch_worker.py``) is its own process, so its peak RSS is its own; the parent sends one
``step`` per round, so the torch steps share the rounds (and the machine's load) with the JAX
steps. Optional: :func:`available` says why the peer is skipped when ``torch`` or ``peft`` is
missing (install them with the ``bench`` extra: ``torch==2.13.0`` and ``peft``).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from jlora._paths import leaves_with_paths

HERE = pathlib.Path(__file__).parent


def available() -> str | None:
    """None if torch and peft import here, else why the PEFT peer is skipped."""
    missing = [m for m in ("torch", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"PEFT peer skipped: {' and '.join(missing)} not installed in {sys.executable}; "
            "install the bench extra (pip install 'torch==2.13.0' peft) to run it"
        )
    return None


class TorchCase:
    """One torch case in a subprocess; calling it runs one step and returns (wall, cpu) seconds."""

    def __init__(self, name: str, case: str, weights: str, spec: dict):
        self.name = name
        self.memory = None
        self.peak_rss = None
        self.first_loss = None
        self.note = "peak RSS of its own process"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "torch_worker.py"), case, weights, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        ready = self._read()
        self.rss_before = ready["rss_before"]
        self.version = ready["torch"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the torch subprocess exited ({self.proc.wait()})")
        return json.loads(line)

    def __call__(self) -> tuple[float, float]:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        out = self._read()
        return out["wall"], out["cpu"]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.peak_rss, self.first_loss = out["peak_rss"], out["first_loss"]
        self.proc.wait()


def cases(
    params, tokens, size, *, rank: int, alpha: float, threads: int = 0, workdir: str | None = None
) -> list[TorchCase]:
    """Starts the torch cases (PEFT all linear and q, v; full; floor) on the Linen weights."""
    flat = {path: np.asarray(leaf) for path, leaf in leaves_with_paths(params)}
    flat["__tokens__"] = np.asarray(tokens)
    workdir = workdir or tempfile.mkdtemp(prefix="jlora-bench-")
    weights = str(pathlib.Path(workdir) / "weights.npz")
    np.savez(weights, **flat)
    spec = {"size": size, "rank": rank, "alpha": alpha, "threads": threads}
    return [
        TorchCase("torch: full", "full", weights, spec),
        TorchCase("torch: floor", "floor", weights, spec),
        TorchCase("PEFT (all linear)", "peft all", weights, spec),
        TorchCase("PEFT (q, v)", "peft qv", weights, spec),
    ]
