import jax
import numpy as np
from trees import transformer_params

import jlora
from jlora import LoraConfig


def test_paper_count_for_query_and_value():
    layers, d_model, r = 3, 16, 4
    params = transformer_params(layers=layers, d_model=d_model)
    adapters = jlora.init(
        jax.random.key(0), params, LoraConfig(targets=r".*(query|value)/kernel", rank=r)
    )
    count = jlora.count_params(params, adapters)
    adapted_matrices = 2 * layers  # the paper's L_LoRA: q and v in every layer
    assert count.trainable == 2 * adapted_matrices * d_model * r
    base = sum(np.size(x) for x in jax.tree.leaves(params))
    assert count.base == base and count.total == base + count.trainable
    assert count.fraction == count.trainable / (base + count.trainable)
    assert str(count) == (
        f"trainable params: {count.trainable:,} || all params: {count.total:,} || "
        f"trainable: {100 * count.fraction:.4f}%"
    )


def test_count_on_abstract_trees():
    params = jax.eval_shape(lambda: transformer_params())
    adapters = jax.eval_shape(
        lambda: jlora.init(jax.random.key(0), params, LoraConfig(targets=".*up/kernel", rank=2))
    )
    assert jlora.count_params(params, adapters).trainable == 2 * (16 * 2 + 2 * 32)
