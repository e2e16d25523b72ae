"""LoRA's follow-ups as composable pieces over the adapter pytree and optax.

* ReLoRA (Lialin et al. 2023): :func:`relora_schedule`, :func:`reset_optimizer_state`,
  :func:`merge_and_reinit`.
* GaLore (Zhao et al. 2024): :func:`galore` (an optax transformation, :class:`GaloreState`),
  and :func:`state_bytes` to compare optimizer-state memory.
* DoRA (Liu et al. 2024): :func:`dora_dense` (the factored layer), :func:`dora_magnitudes`,
  :func:`dora_merge`, :func:`dora_unmerge`; in the Flax transforms ``jlora.linen``'s
  ``LoraModel.apply(..., magnitudes=)`` and :func:`dora_nnx` / :func:`nnx_magnitudes` for NNX;
  PEFT ``use_dora`` files through ``jlora.peft.save(..., magnitudes=)`` and
  ``jlora.peft.load_dora``.
* PiSSA / OLoRA initialisations from the base weight, with the residual base: :func:`pissa_init`,
  :func:`olora_init`, and :func:`residual_to_lora` to export them as plain LoRA over the original
  base; LoRA-FA (``a`` frozen): :func:`lora_fa`.
* AdaLoRA (Zhang et al. 2023): :func:`adalora_init` (:class:`AdaloraFactors`),
  :func:`adalora_orth`, :func:`adalora_update_importance`, :func:`adalora_budget`,
  :func:`adalora_mask`, :func:`adalora_ranks`, :func:`adalora_to_lora` (the plain factors the
  Flax transforms take, in the loss or at the end); PEFT AdaLoRA files through
  ``jlora.peft.load_adalora``.
"""

from ._adalora import AdaloraFactors as AdaloraFactors
from ._adalora import adalora_init as adalora_init
from ._adalora import adalora_orth as adalora_orth
from ._adalora import adalora_ranks as adalora_ranks
from ._adalora import adalora_to_lora as adalora_to_lora
from ._adalora import adalora_total_rank as adalora_total_rank
from ._adalora_importance import AdaloraState as AdaloraState
from ._adalora_importance import adalora_budget as adalora_budget
from ._adalora_importance import adalora_mask as adalora_mask
from ._adalora_importance import adalora_scores as adalora_scores
from ._adalora_importance import adalora_state as adalora_state
from ._adalora_importance import adalora_update_importance as adalora_update_importance
from ._dora import dora_dense as dora_dense
from ._dora import dora_magnitudes as dora_magnitudes
from ._dora_merge import dora_merge as dora_merge
from ._dora_merge import dora_unmerge as dora_unmerge
from ._dora_nnx import dora_nnx as dora_nnx
from ._dora_nnx import nnx_magnitudes as nnx_magnitudes
from ._galore import GaloreState as GaloreState
from ._galore import galore as galore
from ._galore import state_bytes as state_bytes
from ._init_svd import lora_fa as lora_fa
from ._init_svd import olora_init as olora_init
from ._init_svd import pissa_init as pissa_init
from ._init_svd import residual_to_lora as residual_to_lora
from ._relora import merge_and_reinit as merge_and_reinit
from ._relora import relora_schedule as relora_schedule
from ._relora import reset_optimizer_state as reset_optimizer_state

__all__ = [
    "AdaloraFactors",
    "AdaloraState",
    "GaloreState",
    "adalora_budget",
    "adalora_init",
    "adalora_mask",
    "adalora_orth",
    "adalora_ranks",
    "adalora_scores",
    "adalora_state",
    "adalora_to_lora",
    "adalora_total_rank",
    "adalora_update_importance",
    "dora_dense",
    "dora_magnitudes",
    "dora_merge",
    "dora_nnx",
    "dora_unmerge",
    "galore",
    "lora_fa",
    "merge_and_reinit",
    "nnx_magnitudes",
    "olora_init",
    "pissa_init",
    "relora_schedule",
    "reset_optimizer_state",
    "residual_to_lora",
    "state_bytes",
]
