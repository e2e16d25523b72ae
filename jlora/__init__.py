"""jlora: LoRA (low-rank adaptation, Hu et al. 2022) for JAX and Flax.

The base parameter pytree stays frozen; :func:`init` creates a separate pytree of trainable factors
for the weights a :class:`LoraConfig` targets, and :func:`merge` folds them back in.
"""

from . import ops as ops
from ._config import LoraConfig as LoraConfig
from ._count import ParamCount as ParamCount
from ._count import count_params as count_params
from ._custom import CustomLayer as CustomLayer
from ._errors import AdapterMismatchError as AdapterMismatchError
from ._errors import ConfigError as ConfigError
from ._errors import MissingRngError as MissingRngError
from ._errors import NotAnArrayError as NotAnArrayError
from ._errors import SkippedTargetsWarning as SkippedTargetsWarning
from ._errors import TargetError as TargetError
from ._extras import Trainable as Trainable
from ._factors import LoraFactors as LoraFactors
from ._factors import init as init
from ._layout import Layout as Layout
from ._merge import delta as delta
from ._merge import merge as merge
from ._merge import unmerge as unmerge
from ._remat import remat_policy as remat_policy
from ._summary import AdapterSummary as AdapterSummary
from ._summary import summary as summary

__version__ = "0.1.0"

# Framework integrations load on first use (`jlora.linen.lora(...)` after `import jlora`), so that
# `import jlora` does not import Flax, orbax or safetensors.
_SUBMODULES = (
    "analysis",
    "checkpoint",
    "linen",
    "nnx",
    "lowrank",
    "optim",
    "peft",
    "quant",
    "serving",
    "sharding",
    "variants",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'jlora' has no attribute {name!r}")


__all__ = [
    "AdapterMismatchError",
    "AdapterSummary",
    "ConfigError",
    "CustomLayer",
    "Layout",
    "LoraConfig",
    "LoraFactors",
    "MissingRngError",
    "NotAnArrayError",
    "ParamCount",
    "SkippedTargetsWarning",
    "TargetError",
    "Trainable",
    "count_params",
    "delta",
    "init",
    "merge",
    "ops",
    "remat_policy",
    "summary",
    "unmerge",
]
