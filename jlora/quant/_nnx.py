"""`quantize_nnx`: an NNX model's targeted ``nnx.Linear`` kernels stored as :class:`QuantizedWeight`.

The kernel ``nnx.Param`` keeps its place and metadata; its value becomes the quantised weight (a
pytree, so ``nnx.split``, ``nnx.state`` and ``jax.jit`` carry its codes and scales). Adapted with
``jlora.nnx.lora``, each such layer computes its base output with
:func:`jlora.quant.quantized_matmul` (block-wise dequantisation, no float copy of the weight kept
for the backward pass). Only ``nnx.Linear`` is supported: the other layers read their kernel as
an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._config import LoraConfig
from .._errors import TargetError
from ._quantize import _config
from ._weight import QuantizedWeight


def quantize_nnx(
    model: Any,
    config_or_targets: LoraConfig | str | Sequence[str],
    *,
    kind: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> Any:
    """Quantises ``model``'s targeted ``nnx.Linear`` kernels in place and returns ``model``.

    Call it before ``jlora.nnx.lora`` (whose adapters then fit the quantised kernels' shapes).
    Arguments are those of :func:`jlora.quant.quantize`; targets match ``<module path>/kernel``.

    Raises:
        TargetError: a target selects nothing, or a weight that is not an ``nnx.Linear``
            kernel (or that :func:`jlora.quant.quantize` refuses).

    Example:
        >>> import jax.numpy as jnp, jlora.quant
        >>> from flax import nnx
        >>> model = jlora.quant.quantize_nnx(nnx.Linear(64, 128, rngs=nnx.Rngs(0)), "kernel")
        >>> type(model.kernel.get_value()).__name__, model(jnp.ones((2, 64))).shape  # kernel[...]
        ('QuantizedWeight', (2, 128))
    """
    from flax import nnx

    from ._quantize import quantize  # the float checks and messages of the tree version

    config = _config(config_or_targets)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checked = quantize(params, config, kind=kind, block_size=block_size, double_quant=double_quant)
    linears = {
        "/".join(map(str, path)): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, nnx.Linear)
    }

    def visit(tree: Any, prefix: str) -> None:
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, QuantizedWeight):
                owner, _, name = path.rpartition("/")
                if owner not in linears or name != "kernel":
                    raise TargetError(
                        f"{path}: jlora.quant.quantize_nnx quantises nnx.Linear kernels only; "
                        "other layers read their weight as an array. Narrow the targets"
                    )
                linears[owner].kernel.set_value(value)
            elif isinstance(value, dict):
                visit(value, path)

    visit(checked, "")
    return model
