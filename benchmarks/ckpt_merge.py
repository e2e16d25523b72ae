"""Checkpoint-merge throughput: ``jlora.checkpoint.merge_checkpoint`` on the decoder's weights.

``python ckpt_merge.py prepare DIR SPEC_JSON`` writes a base checkpoint (orbax) of the decoder and
an all-linear adapter checkpoint into DIR; ``python ckpt_merge.py merge DIR`` merges them into
``DIR/out`` and prints one JSON line: seconds, bytes, MB/s and the peak RSS of that process (its
own: ``VmHWM`` of a process that did nothing but import and merge).
"""

from __future__ import annotations

import json
import pathlib
import resource
import sys
import time


def _peak_rss() -> int:
    """``VmHWM``: ``getrusage``'s ``ru_maxrss`` would carry the forked parent's size across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare(directory: pathlib.Path, spec: dict) -> None:
    import jax
    import orbax.checkpoint as ocp
    from decoder import Decoder, Size

    import jlora
    import jlora.checkpoint
    import jlora.linen

    size = Size(**spec["size"])
    model = Decoder(size)
    tokens = jax.numpy.zeros((1, size.seq), jax.numpy.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    config = jlora.LoraConfig(targets=spec["targets"], rank=spec["rank"], alpha=spec["alpha"])
    lora = jlora.linen.lora(model, config)
    adapters = lora.init_adapters(jax.random.key(1), params, tokens)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # b != 0, so the merge does real work
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "base", params)
    jlora.checkpoint.save(directory / "adapter", adapters, config, base=params)


def merge(directory: pathlib.Path) -> dict:
    import jlora.checkpoint

    start = time.perf_counter()
    summary = jlora.checkpoint.merge_checkpoint(
        directory / "base", directory / "adapter", directory / "out", overwrite=True
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "bytes": summary.nbytes,
        "mb_per_s": summary.nbytes / seconds / 1e6,
        "peak_rss": _peak_rss(),
    }


if __name__ == "__main__":
    command, where = sys.argv[1], pathlib.Path(sys.argv[2])
    if command == "prepare":
        prepare(where, json.loads(sys.argv[3]))
    else:
        print(json.dumps(merge(where)))
