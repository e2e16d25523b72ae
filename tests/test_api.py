"""Pins the public surface: an accidental export or removal fails here."""

import importlib
import types

import pytest

import jlora


def test_top_level_surface():
    assert sorted(jlora.__all__) == [
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
    # Public submodules (jlora.linen, ...) appear as attributes once imported; they are pinned below.
    public = {
        name
        for name, value in vars(jlora).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(jlora.__all__) - {"ops"}


SUBMODULES = {
    "ops": [
        "LORA_INPUT",
        "attend_branch",
        "conv_branch",
        "dense_branch",
        "dropout",
        "lookup_branch",
    ],
    "serving": [
        "AdapterBank",
        "BASE",
        "BankError",
        "BankFactors",
        "STRATEGIES",
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
    ],
    "sharding": [
        "RANK_AXIS",
        "check_factor_shardings",
        "factor_shardings",
        "factor_specs",
        "init",
        "logical_factor_shardings",
    ],
    "analysis": [
        "DegenerateBasisWarning",
        "UpdateProjection",
        "adapter_tuning_param_count",
        "grassmann_distance",
        "lora_param_count",
        "plot_subspace_similarity",
        "singular_basis",
        "subspace_similarity",
        "subspace_similarity_grid",
        "update_projection",
    ],
    "checkpoint": [
        "MergeSummary",
        "merge_checkpoint",
        "recover_merge",
        "restore",
        "save",
        "save_args",
        "steps",
    ],
    "linen": ["LoraModel", "lora"],
    "lowrank": ["LowRankDense", "LowRankLinear", "init_factors"],
    "nnx": [
        "LoraParam",
        "TRAINABLE",
        "lora",
        "merge",
        "set_adapters",
        "summary",
        "to_adapters",
        "to_state",
    ],
    "optim": ["freeze_base", "labels", "lora_plus", "mask", "scale_by_lora_plus"],
    "quant": [
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
    ],
    "variants": [
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
    ],
    "peft": [
        "CONFIG_NAME",
        "PeftFormatError",
        "WEIGHTS_NAME",
        "load",
        "load_adalora",
        "load_dora",
        "module_to_path",
        "path_to_module",
        "save",
    ],
}


def test_submodules_load_on_attribute_access():
    assert jlora.analysis.subspace_similarity is not None
    with pytest.raises(AttributeError, match="module 'jlora' has no attribute 'lienn'"):
        jlora.lienn  # noqa: B018


@pytest.mark.parametrize("name", sorted(SUBMODULES))
def test_submodule_surface(name):
    module = importlib.import_module(f"jlora.{name}")
    assert sorted(module.__all__) == SUBMODULES[name]
    for attr in module.__all__:
        assert getattr(module, attr) is not None
