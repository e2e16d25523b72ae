"""One PyTorch case (PEFT LoRA, full fine-tune or floor) in its own process, driven over a pipe.

Run by ``peer_peft.py``, never by hand: ``python torch_worker.py CASE WEIGHTS.npz SPEC_JSON``. It
builds the torch twin of the decoder from the Linen weights, prints one JSON line (``ready``, the
loss at the first batch and the resident set size before any step), then for each ``step`` line on
stdin runs one train step and prints its wall and CPU seconds; on ``quit`` it prints the process's
peak resident set size (``VmHWM``: this process only, so every case reports its own).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
import torch
from decoder_torch import PROJECTIONS, Decoder, load_linen_params, next_token_loss


def _status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from /proc/self/status.

    Not ``getrusage``: Linux carries ``ru_maxrss`` across ``exec`` from the forked parent, so a
    child of a large process would report the parent's size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(case: str, flat: dict[str, np.ndarray], spec: dict):
    """Returns ``step() -> loss`` for ``case``: 'peft all', 'peft qv', 'full' or 'floor'."""
    size = spec["size"]
    model = Decoder(size["vocab"], size["d_model"], size["heads"], size["layers"])
    load_linen_params(model, flat)
    tokens = torch.from_numpy(flat["__tokens__"]).long()
    if case == "floor":
        model.requires_grad_(False)
        h0 = torch.zeros(size["batch"], size["seq"], size["d_model"], requires_grad=True)

        def step():
            loss = next_token_loss(model(tokens, h0), tokens)
            torch.autograd.grad(loss, h0)
            return loss

        return step
    if case.startswith("peft"):
        import peft

        targets = list(PROJECTIONS) if case == "peft all" else ["query", "value"]
        config = peft.LoraConfig(
            r=spec["rank"], lora_alpha=spec["alpha"], target_modules=targets, lora_dropout=0.0
        )
        model = peft.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = next_token_loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        return loss

    return step


def main() -> None:
    case, weights, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    flat = dict(np.load(weights))
    step = build(case, flat, spec)
    first_loss = None
    print(
        json.dumps(
            {"ready": True, "rss_before": _status_bytes("VmRSS"), "torch": torch.__version__}
        ),
        flush=True,
    )
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        wall, cpu = time.perf_counter(), time.process_time()
        loss = step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if first_loss is None:
            first_loss = float(loss.detach())
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_rss": peak, "first_loss": first_loss}), flush=True)


if __name__ == "__main__":
    main()
