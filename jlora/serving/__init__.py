"""Serving many LoRA adapters over one base in one compiled program.

An :class:`AdapterBank` stacks ``N`` adapters of one base into fixed-shape arrays (ranks padded
exactly to the bank's largest, scales as an array), so a jitted forward takes any mix of them:

    bank = AdapterBank.build(params, {"fr": fr, "de": de}, capacity=16)
    forward = jax.jit(lambda params, factors, ids, x: apply(model, params, factors, ids, x))
    y = forward(params, bank.factors, bank.ids(["fr", None, "de"]), x)   # None: the base alone
    bank = bank.put(2, es, name="es")          # hot swap: same shapes, no recompilation

Each example ``e`` gets ``h = x W0 + scale[ids[e]] * (x a[ids[e]]) b[ids[e]]``: the base output is
computed once for the whole batch. :func:`dense_term`, :func:`lookup_term`, :func:`attend_term`
and :func:`einsum_term` are the functional per-example terms; :func:`apply` runs any
``flax.linen`` model with them and :func:`nnx_apply` any ``flax.nnx`` model; :func:`combine`
folds a weighted mix of adapters into one exact adapter and :func:`truncate` cuts an adapter to a
lower rank by SVD, reporting the error. :func:`gather` picks each example's factors once (for a
decode loop: pass them with ``ids=None``), and :func:`freeze_scales` wraps an optimizer to train
many adapters at once on a mixed batch (``jax.grad`` with respect to ``bank.factors``; each slot
gets only its own examples' gradient; :meth:`AdapterBank.with_factors` takes the result back).
"""

from .._errors import BankError as BankError
from ._bank import AdapterBank as AdapterBank
from ._combine import combine as combine
from ._combine import truncate as truncate
from ._linen import apply as apply
from ._mixed import STRATEGIES as STRATEGIES
from ._mixed import attend_term as attend_term
from ._mixed import dense_term as dense_term
from ._mixed import einsum_term as einsum_term
from ._mixed import lookup_term as lookup_term
from ._nnx import nnx_apply as nnx_apply
from ._slots import BASE as BASE
from ._slots import BankFactors as BankFactors
from ._train import freeze_scales as freeze_scales
from ._train import gather as gather

__all__ = [
    "BASE",
    "STRATEGIES",
    "AdapterBank",
    "BankError",
    "BankFactors",
    "apply",
    "attend_term",
    "combine",
    "dense_term",
    "einsum_term",
    "freeze_scales",
    "gather",
    "lookup_term",
    "nnx_apply",
    "truncate",
]
