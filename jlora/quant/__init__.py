"""QLoRA: a frozen base quantised to 4 or 8 bits under factored LoRA (Dettmers et al. 2023).

:func:`quantize` stores the targeted weights of a params tree as :class:`QuantizedWeight` nodes:
NF4 (the paper's 16 NormalFloat codes, an absmax per block of 64 values, the absmax constants
double-quantised to 8 bits in blocks of 256: about 4.13 bits per weight), int4 (uniform codes,
same blocks) or int8 (an absmax per output channel). Only the LoRA factors train:

    h = x dequantize(q) + scale * (x a) b

:func:`dequantize` is exact given the stored codes and runs inside the layer's computation: in
``jlora.linen`` (and any Flax Linen model) ``self.param`` unboxes a quantised weight to its
dequantised value, so ``jlora.linen.lora(model, config).apply(qparams, adapters, x)`` needs no
other change. Every layer kind jlora adapts computes its base output without a float copy of the
whole weight, in the forward and the backward pass, in ``jlora.linen`` and (after
:func:`quantize_nnx`) in ``jlora.nnx``:

- ``nn.Dense`` / ``nn.DenseGeneral`` / ``nnx.Linear``: :func:`quantized_matmul`, a block of rows
  at a time;
- ``nn.Einsum`` / ``nnx.Einsum`` (any axis order, e.g. Gemma's ``(heads, d_model, head_dim)``),
  ``nn.Conv`` / ``nnx.Conv`` and an embedding's ``attend``: the layer's own computation on one
  dequantised block of one kernel axis at a time (the longest axis but the last; ``c_in`` for a
  conv; the vocabulary for ``attend``), summed or concatenated by that axis's role;
- an embedding lookup: only the gathered rows (and their absmax constants) are dequantised;
- ``nn.scan`` / ``nnx.vmap``-stacked weights: a scan slice of a :class:`QuantizedWeight` is the
  quantised slice (blocks and double-quantisation constants never straddle stack slices).

Gradients flow to the factors and the layer input only. Layers jlora does not adapt, and plain
``model.apply``, dequantise each weight whole inside their call (:func:`remat` is the checkpoint
policy that recomputes those in the backward pass). Multi-axis kernels need their layout to
quantise (``adapted.infer_layouts(params, x)`` into ``LoraConfig.layouts``; :func:`quantize_nnx`
reads it from the layers): its leading ``s`` axes are stack axes, int8 reduces over its fan-in.
:func:`merge` returns float weights (``dequantize(q) + delta`` in a chosen dtype), optionally
re-quantised with a per-weight error report; :func:`merge_checkpoint` does the same on disk, a
group of weights at a time; :func:`jlora.nnx.merge` merges a :func:`quantize_nnx` model's adapted
layers into float weights of their original dtype (as :func:`merge` with ``dtype=q.dtype``). :func:`save` writes a quantised tree with its quantisation metadata
(``jlora_quant.json``), so :func:`restore` and :func:`merge_checkpoint` need no ``like=``.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora, jlora.linen, jlora.quant
    >>> model = nn.Dense(64)
    >>> x = jnp.ones((2, 128))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> config = jlora.LoraConfig(targets="kernel", rank=4)
    >>> qparams = jlora.quant.quantize(params, config, kind="nf4")
    >>> adapted = jlora.linen.lora(model, config)
    >>> adapters = adapted.init_adapters(jax.random.key(1), jlora.quant.abstract(qparams), x)
    >>> adapted.apply(qparams, adapters, x).shape
    (2, 64)
"""

from ._disk import merge_checkpoint as merge_checkpoint
from ._merge import RequantizationError as RequantizationError
from ._merge import merge as merge
from ._nnx import quantize_nnx as quantize_nnx
from ._product import quantized_matmul as quantized_matmul
from ._quantize import quantize as quantize
from ._remat import remat as remat
from ._store import restore as restore
from ._store import save as save
from ._weight import DEQUANTIZED as DEQUANTIZED
from ._weight import QuantizedWeight as QuantizedWeight
from ._weight import abstract as abstract
from ._weight import dequantize as dequantize
from ._weight import nbytes as nbytes

__all__ = [
    "DEQUANTIZED",
    "QuantizedWeight",
    "RequantizationError",
    "abstract",
    "dequantize",
    "merge",
    "merge_checkpoint",
    "nbytes",
    "quantize",
    "quantize_nnx",
    "quantized_matmul",
    "remat",
    "restore",
    "save",
]
