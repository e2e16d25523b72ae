"""Factored LoRA products: the adapter's term of a layer's output, never forming ``W0 + delta``.

Each function returns only the LoRA term; the caller adds the frozen layer's own output:

    dense:   h = x W0 + scale * (drop(x) a) b
    conv:    h = conv(x, W0) + scale * conv(drop(x), a) b
    lookup:  h = W0[ids] + scale * a[ids] b
    attend:  h = x W0^T + scale * (x b^T) a^T          (a tied embedding used as output head)

Contracting through the rank ``r`` costs ``O(r (fan_in + fan_out))`` per row instead of the
``O(fan_in * fan_out)`` of building the dense update. LoRA dropout (Hu et al. 2022) acts on the
adapter's input only; the base path sees ``x`` untouched. Factors are cast to the input's dtype, so
bfloat16 activations run bfloat16 matmuls against float32 factors (the dense product accumulates
in float32 and rounds its result once).

The factors must be one layer's (no stack axes): inside ``nn.scan`` each step sees its own slice.

**The dense product runs on 2-D views** (all leading axes of ``x`` flattened into one row axis,
multi-axis fan-in/fan-out flattened too), so every product is a plain matrix product. Its backward
pass (autodiff) saves only the adapter's input and the rank-``r`` intermediate, and computes

    g_r = s (g b^T),   grad a = (g_r^T x)^T,   grad b = (s x a)^T g,   grad x = g_r a^T

with the gradient of ``a`` formed rank-axis-leading, ``(r, fan_in)``, and transposed only at that
small end: ``a`` enters the forward product as its transpose behind an optimisation barrier, which
keeps XLA from folding the transpose back into the ``(fan_in, r)``-major product that XLA:CPU runs
several times slower. The values equal plain autodiff of ``(x a) b`` to round-off
(``tests/test_ops_fast.py``).

**Saved inputs and recomputation.** A LoRA step must keep each adapter's input for the gradient of
``a``: the one activation a frozen model's backward pass would not keep. The dense, conv and
attend branches tag that input (after dropout) ``jax.ad_checkpoint.checkpoint_name(x, "lora_input")``
(``LORA_INPUT``), for remat policies that select by name (``save_only_these_names``, the offloading
policies). A policy cannot drop it by name alone: the array before the tag (a LayerNorm's or GELU's
output) is the same value and stays saveable. To trade time for memory, recompute whole blocks
instead: the blocks under ``nn.scan`` / ``nnx.scan``, each under ``nn.remat`` / ``nnx.remat`` with
``jlora.remat_policy()``, which keeps the base's projections and the rank-``r`` ``x a`` and
recomputes the adapters' inputs with the rest of the block (a Python loop of rematted blocks does
not lower the peak on XLA:CPU, which drops the barriers that order the recomputation).
"""

from ._conv import conv_branch as conv_branch
from ._dense import dense_branch as dense_branch
from ._dropout import dropout as dropout
from ._embedding import attend_branch as attend_branch
from ._embedding import lookup_branch as lookup_branch
from ._operands import LORA_INPUT as LORA_INPUT

__all__ = [
    "LORA_INPUT",
    "attend_branch",
    "conv_branch",
    "dense_branch",
    "dropout",
    "lookup_branch",
]
