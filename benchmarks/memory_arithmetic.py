"""Per-device memory of LoRA vs full fine-tuning at 7B and 70B parameters, for a few meshes.

Pure arithmetic (no JAX): the numbers in ``docs/scaling.md`` come from ``python
benchmarks/memory_arithmetic.py``, and a test checks that the page shows this script's output.

Models are Llama-2-shaped (pre-norm, SwiGLU MLP, grouped-query attention at 70B, untied
embeddings). Meshes are ``(fsdp, tp)``: weights are split over both axes (Megatron tensor
parallelism over ``tp``, the other weight axis over ``fsdp``), each ``fsdp`` rank takes its own
slice of the batch, and LoRA factors take the specs jlora derives (``a`` the weight's fan-in
sharding, ``b`` its fan-out sharding, the rank axis replicated). Assumptions, one place:

* Full fine-tuning: bf16 weights and gradients, an f32 master copy, f32 Adam moments
  (2 + 2 + 4 + 8 = 16 bytes per parameter), all fully sharded over the ``fsdp x tp`` devices.
* LoRA: frozen bf16 base weights (2 bytes per parameter, no gradient, no optimizer state), rank
  16 on every attention and MLP projection (q, k, v, o, gate, up, down); f32 factors, f32 factor
  gradients and f32 Adam moments (4 + 4 + 8 = 16 bytes per factor parameter).
* Both: FSDP gathers one layer's weights at a time (one layer's bf16 weights, split over ``tp``,
  are added); sequence 4096 tokens, one sequence per ``fsdp`` rank (per data-parallel replica);
  bf16 activations with one checkpoint (``remat``) per block, so the saved activations are each
  block's input (``h`` values per token, replicated over ``tp``: no sequence parallelism) plus one
  block's working set while it is recomputed; attention without the ``seq x seq`` score matrix
  (a fused / flash kernel); f32 logits and their gradient, split over ``tp`` (vocab-parallel).
* Not counted: XLA temporaries and fragmentation, collective buffers, the data pipeline, and
  framework overhead; real peaks are higher. Treat the numbers as lower bounds that compare the
  two methods, not as a promise that a configuration fits.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
SEQ = 4096
RANK = 16


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    layers: int
    d_model: int
    kv_dim: int  # heads_kv * head_dim: d_model without grouped-query attention
    d_ff: int
    vocab: int

    def matrices(self) -> dict[str, tuple[int, int, str]]:
        """One layer's projections: ``{name: (fan_in, fan_out, 'column' | 'row')}``."""
        d, kv, f = self.d_model, self.kv_dim, self.d_ff
        return {
            "q": (d, d, "column"),
            "k": (d, kv, "column"),
            "v": (d, kv, "column"),
            "o": (d, d, "row"),
            "gate": (d, f, "column"),
            "up": (d, f, "column"),
            "down": (f, d, "row"),
        }

    def layer_params(self) -> int:
        return sum(i * o for i, o, _ in self.matrices().values()) + 2 * self.d_model  # + norms

    def params(self) -> int:
        return self.layers * self.layer_params() + 2 * self.vocab * self.d_model + self.d_model

    def lora_params(self, rank: int = RANK) -> int:
        return self.layers * sum(rank * (i + o) for i, o, _ in self.matrices().values())


MODELS = (
    Model("7B", layers=32, d_model=4096, kv_dim=4096, d_ff=11008, vocab=32000),
    Model("70B", layers=80, d_model=8192, kv_dim=1024, d_ff=28672, vocab=32000),
)
MESHES = ((1, 1), (8, 1), (1, 8), (8, 8), (32, 8))  # (fsdp, tp)


def factor_bytes_per_device(model: Model, fsdp: int, tp: int, rank: int = RANK) -> float:
    """f32 factors + f32 gradients + 2 f32 Adam moments, as jlora shards them.

    Column-parallel ``W: P(fsdp, tp)`` gives ``a: P(fsdp, None)``, ``b: P(None, tp)``;
    row-parallel ``W: P(tp, fsdp)`` gives ``a: P(tp, None)``, ``b: P(None, fsdp)``.
    """
    per_layer = 0.0
    for fan_in, fan_out, kind in model.matrices().values():
        split_in, split_out = (fsdp, tp) if kind == "column" else (tp, fsdp)
        per_layer += rank * fan_in / split_in + rank * fan_out / split_out
    return 16 * model.layers * per_layer


def activation_bytes_per_device(model: Model, fsdp: int, tp: int, lora: bool) -> float:
    """Saved block inputs + one block's working set + logits and their gradient."""
    tokens = SEQ  # one sequence per fsdp rank; tp ranks share it
    d, kv, f = model.d_model, model.kv_dim, model.d_ff
    saved_inputs = model.layers * tokens * d * 2
    # Per token in one block: 4 d-sized tensors replicated over tp (norm inputs and outputs), and
    # the q, k, v, attention output, gate, up and gate*up tensors split over tp.
    working = tokens * 2 * (4 * d + (2 * d + 2 * kv + 3 * f) / tp)
    if lora:
        working += tokens * 2 * RANK * len(model.matrices())  # the (x a) intermediates
    logits = tokens * model.vocab * 4 * 2 / tp
    return saved_inputs + working + logits


def per_device(model: Model, fsdp: int, tp: int, method: str) -> dict[str, float]:
    """Bytes per device by kind, for ``method`` 'full' or 'lora'."""
    n = fsdp * tp
    p = model.params()
    gathered_layer = (2 * model.layer_params() / tp) if fsdp > 1 else 0.0
    if method == "full":
        out = {
            "weights": 2 * p / n + gathered_layer,
            "gradients": 2 * p / n,
            "optimizer": (4 + 8) * p / n,  # f32 master copy + 2 Adam moments
        }
    else:
        factors = factor_bytes_per_device(model, fsdp, tp)
        out = {
            "weights": 2 * p / n + gathered_layer + factors / 4,  # + f32 factors
            "gradients": factors / 4,
            "optimizer": factors / 2,
        }
    out["activations"] = activation_bytes_per_device(model, fsdp, tp, lora=method == "lora")
    out["total"] = sum(out.values())
    return out


def table() -> str:
    """The Markdown table of ``docs/scaling.md``: GiB per device."""
    rows = [
        "| model | devices (fsdp x tp) | method | weights | gradients | optimizer | activations "
        "| total |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model in MODELS:
        for fsdp, tp in MESHES:
            for method in ("full", "lora"):
                m = per_device(model, fsdp, tp, method)
                cells = " | ".join(f"{m[k] / GIB:.2f}" for k in list(m)[:-1])
                rows.append(
                    f"| {model.name} | {fsdp * tp} ({fsdp} x {tp}) | {method} | {cells} | "
                    f"**{m['total'] / GIB:.1f}** |"
                )
    return "\n".join(rows)


def summary() -> str:
    """Parameter counts, as stated in ``docs/scaling.md``."""
    lines = []
    for model in MODELS:
        p, r = model.params(), model.lora_params()
        lines.append(
            f"- {model.name}: {p / 1e9:.2f}B parameters; LoRA rank {RANK} on q, k, v, o, gate, "
            f"up, down: {r / 1e6:.1f}M trainable ({100 * r / p:.2f}%)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
    print()
    print(table())
