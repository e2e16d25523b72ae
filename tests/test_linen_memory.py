"""A LoRA train step's temporaries stay within the frozen base's plus the adapters' own share.

The share is what LoRA cannot avoid holding per adapted layer (float32, ``N`` rows):
the layer input kept for ``a``'s gradient and the branch's cotangent into it (``2 N fan_in``),
``x a`` and its cotangent (``2 N r``), and one factor-sized buffer (``r (fan_in + fan_out)``).
Building ``W0 + delta`` (``fan_in x fan_out`` per layer) would overshoot it many times over.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

import jlora
import jlora.linen

ROWS, WIDTH, RANK, LAYERS = 16, 512, 4, 3


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = nn.relu(nn.Dense(WIDTH, name=f"hidden_{i}")(x))
        return nn.Dense(10, name="head")(x)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_lora_step_temporaries_are_the_floor_plus_the_adapters_share():
    model = MLP()
    x = jnp.ones((ROWS, WIDTH))
    params = model.init(jax.random.key(0), x)["params"]
    lora = jlora.linen.lora(model, jlora.LoraConfig(targets=r"hidden_\d/kernel", rank=RANK))
    adapters = lora.init_adapters(jax.random.key(1), params, x)

    def floor(params, x):  # frozen forward + backward for activations only
        return jax.grad(lambda x: jnp.sum(model.apply({"params": params}, x) ** 2))(x)

    def lora_step(adapters, params, x):
        return jax.grad(lambda a: jnp.sum(lora.apply(params, a, x) ** 2))(adapters)

    def merged_step(adapters, params, x):  # the naive step, as a control the bound must catch
        return jax.grad(lambda a: jnp.sum(model.apply({"params": jlora.merge(params, a)}, x) ** 2))(
            adapters
        )

    share = 4 * LAYERS * (2 * ROWS * WIDTH + 2 * ROWS * RANK + RANK * (WIDTH + WIDTH))
    budget = _temp_bytes(floor, params, x) + share
    assert _temp_bytes(lora_step, adapters, params, x) <= budget
    assert _temp_bytes(merged_step, adapters, params, x) > 2 * budget
