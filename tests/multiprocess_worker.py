"""One of two JAX processes on loopback for ``test_multiprocess.py``: a sharded LoRA step and a
sharded adapter checkpoint across both processes' devices.

Usage: ``python multiprocess_worker.py PROCESS_ID PORT OUT_DIR``, with ``XLA_FLAGS`` giving each
process 4 CPU devices. The two processes form one 8-device ``(data=2, model=4)`` mesh, the data
axis across processes and the model axis within each. Weights are FSDP x TP sharded
(``sharded_decoder.specs(fsdp="data")``), so factors are split across processes too. Each process
writes ``OUT_DIR/process_<i>.npz``: the losses, and for every factor a global-shaped array holding
this process's shards and NaN elsewhere, after training and after a checkpoint round trip.
"""

import os
import sys

import jax
import numpy as np

STEPS = 3


def local_view(x: jax.Array) -> np.ndarray:
    """``x``'s global shape, filled with this process's shards and NaN elsewhere."""
    out = np.full(x.shape, np.nan, np.float32)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


def main(process_id: int, port: int, out_dir: str) -> None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default since jax 0.5
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates here
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
    )
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sharded_decoder as sd
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jlora.checkpoint
    from jlora import sharding as lsh

    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))  # rows: processes

    def global_array(value, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    # Every process builds the same NumPy values and keeps only its own shards.
    host_params = sd.params()
    params = jax.tree.map(global_array, host_params, sd.specs(host_params, fsdp="data"))
    x, y = (global_array(v, P("data", None)) for v in sd.batch())

    losses, adapters = sd.train(params, x, y, STEPS)

    # Each process writes its own shards; restore onto another layout (Megatron, no FSDP).
    path = jlora.checkpoint.save(os.path.join(out_dir, "adapter"), adapters, sd.CONFIG, base=params)
    megatron = lsh.factor_shardings(adapters, sd.specs(host_params), mesh)
    restored, config = jlora.checkpoint.restore(path, shardings=megatron, base=params)
    assert config == sd.CONFIG
    for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(megatron), strict=True):
        assert r.sharding == s

    flat = jlora._paths.leaves_with_paths
    np.savez(
        os.path.join(out_dir, f"process_{process_id}.npz"),
        losses=np.array(losses),
        **{f"trained/{p}": local_view(v) for p, v in flat(adapters)},
        **{f"restored/{p}": local_view(v) for p, v in flat(restored)},
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
