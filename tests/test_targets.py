"""Targets the way users write them: module names, the "all-linear" preset, non-strict mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_nnx import materialise
from trees import transformer_params

import jlora
import jlora.linen
import jlora.nnx
from jlora import LoraConfig, SkippedTargetsWarning, TargetError
from jlora._merge import factors_by_path


def _paths(adapters) -> list[str]:
    return sorted(factors_by_path(adapters))


def test_non_strict_adapts_what_it_can_and_reports_the_rest():
    params = transformer_params()
    config = LoraConfig(targets=".*", rank=2, strict=False)
    with pytest.warns(SkippedTargetsWarning) as record:
        adapters = jlora.init(jax.random.key(0), params, config)
    two_d = sorted(p for p, x in jlora._paths.leaves_with_paths(params) if np.ndim(x) == 2)
    assert _paths(adapters) == two_d
    message = str(record[0].message)
    assert "jlora skipped 16 targeted weight(s)" in message  # 12 biases, 4 layer-norm vectors
    assert "layers_0/ln/scale: targeted a weight of shape (16,) (rank 1)" in message
    with pytest.raises(TargetError, match=r"targeted a weight of shape"):
        jlora.init(jax.random.key(0), params, LoraConfig(targets=".*", rank=2))


def test_non_strict_still_needs_something_to_adapt():
    config = LoraConfig(targets=".*bias", strict=False)
    with pytest.raises(TargetError, match=r"select no adaptable weight.*skipped: jlora skipped"):
        jlora.init(jax.random.key(0), transformer_params(), config)


def test_all_linear_in_the_functional_core_is_every_kernel():
    params = {
        "conv": {"kernel": np.ones((3, 3, 2, 4), np.float32)},
        "dense": {"kernel": np.ones((4, 5), np.float32), "bias": np.zeros(5, np.float32)},
        "embed": {"embedding": np.ones((7, 4), np.float32)},
    }
    with pytest.warns(SkippedTargetsWarning, match=r"conv/kernel: weight of shape \(3, 3, 2, 4\)"):
        adapters = jlora.init(jax.random.key(0), params, LoraConfig(targets="all-linear", rank=2))
    assert _paths(adapters) == ["dense/kernel"]


def test_config_round_trip_keeps_strict():
    config = LoraConfig(targets=["query", "all-linear"], strict=False)
    assert LoraConfig.from_dict(config.to_dict()) == config
    assert "strict" not in LoraConfig(targets="q").to_dict()  # defaults stay readable by 0.1
    with pytest.raises(jlora.ConfigError, match=r"LoraConfig.strict: 0 is not a bool"):
        LoraConfig(targets="q", strict=0)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln")(x)
        q = nn.Dense(8, name="query")(h)
        v = nn.DenseGeneral((2, 4), name="value")(h)
        return x + nn.Dense(8, name="out")(q * v.reshape(q.shape))


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(13, 8, name="embed")(ids)
        x = nn.Conv(8, (3,), name="conv")(x)
        x = Block(name="block_0")(x)
        x = Block(name="block_1")(x)
        return nn.Dense(13, name="lm_head")(x)


def _lm():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 13, size=(2, 5)))
    params = jax.eval_shape(TinyLM().init, jax.random.key(0), ids)["params"]
    return ids, params


def test_linen_all_linear_skips_convs_embeddings_norms_and_the_head():
    ids, params = _lm()
    adapted = jlora.linen.lora(TinyLM(), LoraConfig(targets="all-linear", rank=2))
    adapters = adapted.init_adapters(jax.random.key(0), params, ids)
    assert _paths(adapters) == [
        f"block_{i}/{n}/kernel" for i in (0, 1) for n in ("out", "query", "value")
    ]


def test_linen_module_names_and_non_strict():
    ids, params = _lm()
    names = jlora.linen.lora(TinyLM(), LoraConfig(targets=["query", "block_1/value"], rank=2))
    assert _paths(names.init_adapters(jax.random.key(0), params, ids)) == [
        "block_0/query/kernel",
        "block_1/query/kernel",
        "block_1/value/kernel",
    ]
    loose = jlora.linen.lora(TinyLM(), LoraConfig(targets=".*", rank=2, strict=False))
    with pytest.warns(SkippedTargetsWarning) as record:
        adapters = loose.init_adapters(jax.random.key(0), params, ids)
    assert len(_paths(adapters)) == 9  # 6 block kernels, conv, embedding, head
    message = str(record[0].message)
    assert "block_0/ln/scale: the module at 'block_0/ln' is a nn.LayerNorm" in message
    strict = jlora.linen.lora(TinyLM(), LoraConfig(targets=".*", rank=2))
    with pytest.raises(
        TargetError, match=r"block_0/ln/bias: the module at 'block_0/ln' is a nn.LayerNorm"
    ):
        strict.init_adapters(jax.random.key(0), params, ids)


class NnxLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(13, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 8, (3,), rngs=rngs)
        self.query = nnx.Linear(8, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.lm_head = nnx.Linear(8, 13, rngs=rngs)

    def __call__(self, ids):
        return self.lm_head(self.norm(self.query(self.conv(self.embed(ids)))))


def test_nnx_all_linear_and_non_strict():
    model = jlora.nnx.lora(materialise(NnxLM), LoraConfig(targets="all-linear", rank=2), rngs=0)
    assert _paths(jlora.nnx.to_adapters(model)) == ["query/kernel"]
    with pytest.warns(SkippedTargetsWarning, match=r"norm/scale: the targets select"):
        model = jlora.nnx.lora(
            materialise(NnxLM), LoraConfig(targets=".*", rank=2, strict=False), rngs=0
        )
    assert _paths(jlora.nnx.to_adapters(model)) == [
        "conv/kernel",
        "embed/embedding",
        "lm_head/kernel",
        "query/kernel",
    ]


def test_summary_lists_each_adapted_weight_with_its_kind_and_counts():
    ids, params = _lm()
    adapted = jlora.linen.lora(
        TinyLM(), LoraConfig(targets=["query", "value", "embed"], rank=2, alpha=4.0)
    )
    adapters = adapted.init_adapters(jax.random.key(0), params, ids)
    table = adapted.summary(params, adapters, ids)
    rows = {r.path: r for r in table.rows}
    assert rows["block_0/value/kernel"].kind == "nn.DenseGeneral"
    assert rows["block_0/value/kernel"].shape == (8, 2, 4)
    assert rows["block_0/value/kernel"].params == 8 * 2 + 2 * 8
    assert rows["embed/embedding"].kind == "nn.Embed" and rows["embed/embedding"].scale == 2.0
    assert table.trainable_params == jlora.count_params(params, adapters).trainable
    base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert table.base_params == base
    text = str(table).splitlines()
    assert text[0].split() == ["path", "kind", "weight", "shape", "rank", "scale", "params"]
    assert len(text) == 2 + len(rows)
    assert text[-1].startswith(f"trainable params: {table.trainable_params:,} of {base:,}")
