"""Parameter trees shaped like real models, as plain dicts of NumPy float32 arrays."""

import numpy as np


def transformer_params(
    seed: int = 0, *, layers: int = 2, d_model: int = 16, d_ff: int = 32, vocab: int = 11
) -> dict:
    """A GPT-shaped tree: embedding, per-layer q/k/v/o and MLP kernels with biases, layer norms."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)

    tree = {"embed": {"embedding": w(vocab, d_model)}}
    for i in range(layers):
        tree[f"layers_{i}"] = {
            "attn": {
                name: {"kernel": w(d_model, d_model), "bias": np.zeros(d_model, np.float32)}
                for name in ("query", "key", "value", "out")
            },
            "mlp": {
                "up": {"kernel": w(d_model, d_ff), "bias": np.zeros(d_ff, np.float32)},
                "down": {"kernel": w(d_ff, d_model), "bias": np.zeros(d_model, np.float32)},
            },
            "ln": {"scale": np.ones(d_model, np.float32), "bias": np.zeros(d_model, np.float32)},
        }
    return tree


def random_factors(adapters, seed: int = 1):
    """The same adapters with every factor replaced by non-zero random values (as after training)."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), adapters)
