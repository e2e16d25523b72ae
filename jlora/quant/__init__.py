"""QLoRA: a frozen base quantised to 4 or 8 bits under factored LoRA (Dettmers et al. 2023).

:func:`quantize` stores the targeted weights of a params tree as :class:`QuantizedWeight` nodes:
NF4 (the paper's 16 NormalFloat codes, an absmax per block of 64 values, the absmax constants
double-quantised to 8 bits in blocks of 256: about 4.13 bits per weight), int4 (uniform codes,
same blocks) or int8 (an absmax per output channel). Only the LoRA factors train:

    h = x dequantize(q) + scale * (x a) b

:func:`dequantize` is exact given the stored codes and runs inside the layer's computation: in
``jlora.linen`` (and any Flax Linen model) ``self.param`` unboxes a quantised weight to its
dequantised value, so ``jlora.linen.lora(model, config).apply(qparams, adapters, x)`` needs no
other change. The adapted ``nn.Dense`` / ``nn.DenseGeneral`` (and, after :func:`quantize_nnx`,
``nnx.Linear``) compute their base output with :func:`quantized_matmul`, which dequantises a block
of rows at a time in the forward and the backward pass, so no float copy of a whole weight is kept
(elsewhere autodiff keeps each dequantised weight; :func:`remat` is the checkpoint policy for that).
:func:`merge` returns float weights (``dequantize(q) + delta`` in a chosen dtype), optionally
re-quantised with a per-weight error report; :func:`merge_checkpoint` does the same on disk, a
group of weights at a time.

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
