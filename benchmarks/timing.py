"""Interleaved timing of compiled steps, and XLA's memory account of each.

On a shared machine the wall clock measures the other processes as much as the step, so every case
is timed in rounds: one call of each case per round, all cases in the same round, so a burst of load
lands on all of them alike. Each call records the wall clock and this process's CPU time
(``time.process_time``, all threads): on a CPU whose cores other jobs share, CPU time is the cost of
the step itself, while wall time adds whatever waited for a core. Medians over the rounds.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass
class Measured:
    """One case's medians (seconds), its memory (bytes) and a note (e.g. the loss it computed)."""

    name: str
    wall: float
    cpu: float
    memory_bytes: int | None = None
    peak_rss_bytes: int | None = None
    rss_before_bytes: int | None = None
    loss: float | None = None
    note: str = ""

    def seconds(self, clock: str) -> float:
        return self.cpu if clock == "cpu" else self.wall


def memory_bytes(compiled: Any) -> int | None:
    """XLA's own account of a compiled step: arguments + temporaries + outputs - donated aliases."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.temp_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    )


class JaxCase:
    """A jitted step: its first ``carry`` outputs feed back as its first ``carry`` inputs."""

    def __init__(
        self, name: str, step: Callable, args: tuple, *, carry: int, loss_index: int | None
    ):
        self.name = name
        self.compiled = step.lower(*args).compile()
        self.args = args
        self.carry = carry
        self.loss_index = loss_index
        self.first_loss: float | None = None
        self.memory = memory_bytes(self.compiled)

    def __call__(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = self.compiled(*self.args)
        jax.block_until_ready(out)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if self.first_loss is None and self.loss_index is not None:
            self.first_loss = float(out[self.loss_index])
        if self.carry:
            self.args = (*out[: self.carry], *self.args[self.carry :])
        return wall, cpu

    def close(self) -> None:
        """Frees this case's buffers (the compiled step and its carried state)."""
        self.args = ()
        self.compiled = None


def run_rounds(
    cases: list[Any], *, steps: int, warmup: int, log: Callable[[str], None]
) -> list[Measured]:
    """Times every case ``warmup + steps`` times, one call of each per round; returns medians.

    A case is any callable returning ``(wall seconds, cpu seconds)`` with ``name`` and optional
    ``memory``, ``peak_rss``, ``first_loss`` attributes.
    """
    samples: dict[str, list[tuple[float, float]]] = {c.name: [] for c in cases}
    for i in range(warmup + steps):
        for case in cases:
            wall, cpu = case()
            if i >= warmup:
                samples[case.name].append((wall, cpu))
        if i >= warmup:
            log(f"  round {i - warmup + 1}/{steps}, load average {os.getloadavg()[0]:.1f}")
    out = []
    for case in cases:
        walls, cpus = zip(*samples[case.name], strict=True)
        out.append(
            Measured(
                case.name,
                statistics.median(walls),
                statistics.median(cpus),
                memory_bytes=getattr(case, "memory", None),
                peak_rss_bytes=getattr(case, "peak_rss", None),
                rss_before_bytes=getattr(case, "rss_before", None),
                loss=getattr(case, "first_loss", None),
                note=getattr(case, "note", ""),
            )
        )
    return out
