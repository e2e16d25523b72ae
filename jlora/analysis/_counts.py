"""The paper's trainable-parameter counts for LoRA and for adapter tuning (closed forms)."""

from __future__ import annotations

from .. import _checks


def lora_param_count(num_matrices: int, d_model: int, rank: int) -> int:
    """The paper's LoRA count ``|Theta| = 2 * L_lora * d_model * r`` (square ``d_model`` weights).

    Example:
        >>> lora_param_count(num_matrices=2 * 96, d_model=12288, rank=4)  # GPT-3, q and v, r = 4
        18874368
    """
    num_matrices = _checks.count(num_matrices, "num_matrices")
    d_model = _checks.count(d_model, "d_model", 1)
    rank = _checks.count(rank, "rank", 1)
    return 2 * num_matrices * d_model * rank


def adapter_tuning_param_count(
    num_adapters: int, d_model: int, rank: int, num_layer_norms: int
) -> int:
    """Adapter tuning's count ``L_adpt (2 d_model r + r + d_model) + 2 L_LN d_model`` (the paper's).

    Example:
        >>> adapter_tuning_param_count(num_adapters=24, d_model=1024, rank=8, num_layer_norms=48)
        516288
    """
    num_adapters = _checks.count(num_adapters, "num_adapters")
    d_model = _checks.count(d_model, "d_model", 1)
    rank = _checks.count(rank, "rank", 1)
    num_layer_norms = _checks.count(num_layer_norms, "num_layer_norms")
    return num_adapters * (2 * d_model * rank + rank + d_model) + 2 * num_layer_norms * d_model
