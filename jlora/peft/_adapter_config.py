"""PEFT's ``adapter_config.json`` for LoRA: written from per-module ranks and alphas, read back.

PEFT gives the module named ``m`` (its dotted name inside the torch model) the rank
``rank_pattern[key]`` for the first ``key``, in the dict's order, with
``re.match(rf"(.*\\.)?({key})$", m)``: the key is a regex matched against a dot-aligned suffix of the
name; with no such key the rank is ``r``. ``alpha_pattern`` and ``lora_alpha`` work the same way, and
the scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), as in jlora. A list
``target_modules`` selects names equal to an entry or ending in ``"." + entry``; a string one is a
regex that must match the whole name. This module applies those rules itself, so a written config
is checked to give every module exactly its rank and alpha before anything reaches the disk.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .._errors import PeftFormatError

PEFT_TYPE = "LORA"

# peft.LoraConfig's fields (and its PeftConfig base's) as of PEFT 0.21; any other key is warned about.
_KNOWN_FIELDS = frozenset(
    """
    task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode
    r target_modules exclude_modules lora_alpha lora_dropout fan_in_fan_out bias use_rslora
    modules_to_save init_lora_weights layers_to_transform layers_pattern rank_pattern alpha_pattern
    megatron_config megatron_core trainable_token_indices loftq_config eva_config corda_config
    lora_ga_config use_dora velora_config alora_invocation_tokens use_qalora qalora_group_size
    monteclora_config layer_replication runtime_config lora_bias target_parameters use_bdlora
    arrow_config ensure_weight_tying kasa_config
    """.split()
)

# Settings that change what the adapted model computes in a way jlora's factors cannot hold.
_UNSUPPORTED = {
    "use_dora": "DoRA adds a learned magnitude vector to each weight",
    "lora_bias": "lora_B carries a bias",
    "bias": "the file also holds trained biases of the base model",
    "trainable_token_indices": "selected embedding rows are trained as full vectors",
    "layer_replication": "the model's layers are replicated before adapting",
    "alora_invocation_tokens": "activated LoRA applies the adapter only after its invocation tokens",
    "use_qalora": "QALoRA pools the adapter's input",
    "target_parameters": "adapters act on raw nn.Parameters, not modules",
    "use_bdlora": "block-diagonal LoRA factors",
    "monteclora_config": "Monte Carlo sampling on top of the factors",
    "arrow_config": "routing between several adapters",
    "kasa_config": "KaSA is a LoRA variant with parameters beyond A and B",
}
_OFF = (None, False, "none", (), [], {})


def _applies(key: str, module: str) -> bool:
    try:
        return re.match(rf"(.*\.)?({key})$", module) is not None
    except re.error:
        return False


def resolve(table: Mapping[str, Any], default: Any, module: str) -> Any:
    """``table``'s value for ``module`` under PEFT's rule (first applicable key), or ``default``."""
    key = next((k for k in table if _applies(k, module)), None)
    return default if key is None else table[key]


def pattern_table(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """A PEFT pattern dict giving each module in ``values`` its value (``default`` needs no entry).

    Every module must be matched by its own key only (or by none, when it has the default), so the
    result does not depend on the keys' order (PEFT re-sorts them when it saves a config). Module
    names serve as keys as they are, the form PEFT users write, when that holds; otherwise (a name
    is a dotted suffix of another, or has regex characters) every key is anchored and escaped,
    ``^name``, which matches that one name.
    """
    overrides = {m: v for m, v in values.items() if v != default}
    for key_of in ({m: m for m in overrides}, {m: "^" + re.escape(m) for m in overrides}):
        if all(
            [k for k in key_of.values() if _applies(k, m)] == ([key_of[m]] if m in key_of else [])
            for m in values
        ):
            return {key_of[m]: v for m, v in overrides.items()}
    raise AssertionError("anchored PEFT patterns match one name each")  # pragma: no cover


def selects(target_modules: str | Sequence[str], module: str, kind: str) -> bool:
    """Whether PEFT's ``target_modules`` selects ``module`` (``"all-linear"``: every linear one)."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return kind == "linear"
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def json_number(x: float) -> int | float:
    """``16.0`` as ``16`` (PEFT writes integer alphas), other values unchanged."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


@dataclasses.dataclass(frozen=True)
class PeftSettings:
    """What jlora reads from an ``adapter_config.json``."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    lora_dropout: float
    init: str
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False  # read by jlora.peft.load_dora only; load refuses such files

    def rank_for(self, module: str) -> int:
        return resolve(self.rank_pattern, self.r, module)

    def alpha_for(self, module: str) -> float:
        return float(resolve(self.alpha_pattern, self.lora_alpha, module))


def _field(data: Mapping[str, Any], name: str, default: Any, types: tuple, where: str) -> Any:
    value = data.get(name, default)
    if value is None:
        value = default
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise PeftFormatError(
            f"{where}: {name!r} is {value!r}; expected {' or '.join(t.__name__ for t in types)}. "
            "Is this file a PEFT LoRA adapter config?"
        )
    return value


def _table(data: Mapping[str, Any], name: str, check: type, where: str) -> dict[str, Any]:
    table = data.get(name) or {}
    if not isinstance(table, Mapping) or not all(
        isinstance(k, str)
        and isinstance(v, (int, float) if check is float else int)
        and not isinstance(v, bool)
        for k, v in table.items()
    ):
        raise PeftFormatError(
            f"{where}: {name!r} is {table!r}; expected a dict from module-name pattern to "
            f"{'number' if check is float else 'integer'}"
        )
    for key in table:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise PeftFormatError(
                f"{where}: {name} key {key!r} is not a valid regular expression ({e}); PEFT "
                "raises on it too. Fix the pattern (re.escape a literal module name)"
            ) from None
    return {k: check(v) for k, v in table.items()}


# PEFT's init_lora_weights values that leave the base model as it is: the saved factors are the
# whole adapter. The others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, ...) subtract the initial
# adapter from the base weights, so the file fits only PEFT's modified (residual) base.
_PLAIN_INITS = (True, False, "gaussian", "eva")


def _init(data: Mapping[str, Any], where: str) -> str:
    init = data.get("init_lora_weights", True)
    if init is None:
        init = True
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        raise PeftFormatError(
            f"{where}: init_lora_weights = {init!r} is not supported: that initialisation "
            "(PiSSA, OLoRA, CorDA, LoftQ, ...) changes the base model's weights, so these factors "
            "only fit PEFT's residual base, not the original model jlora would merge them into. "
            "Convert the adapter to plain LoRA with PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion=...)"
        )
    return "gaussian" if init == "gaussian" else "kaiming_uniform"


def read(data: Any, where: str) -> PeftSettings:
    """Validates a parsed ``adapter_config.json``; ``where`` names the file in messages.

    Raises:
        PeftFormatError: not a LoRA config, a setting jlora cannot represent, or a malformed field.
    """
    if not isinstance(data, Mapping):
        raise PeftFormatError(f"{where}: holds a {type(data).__name__}; expected a JSON object")
    peft_type = data.get("peft_type")
    if peft_type != PEFT_TYPE:
        raise PeftFormatError(
            f"{where}: peft_type is {peft_type!r}; expected {PEFT_TYPE!r}. jlora reads LoRA adapters "
            "only (not IA3, LoHa, prefix tuning, ...)"
        )
    for name, why in _UNSUPPORTED.items():
        if name == "use_dora" and data.get(name) is True:
            continue  # DoRA files: jlora.peft.load_dora
        if data.get(name) not in _OFF:
            raise PeftFormatError(
                f"{where}: {name} = {data[name]!r} is not supported: {why}, which jlora's LoRA factors "
                f"cannot represent. Only plain LoRA adapters ({name} unset) can be read"
            )
    unknown = sorted(set(data) - _KNOWN_FIELDS)
    if unknown:
        warnings.warn(
            f"{where}: ignoring unknown keys {unknown} (written by a newer PEFT?); the adapters are "
            "read from r, lora_alpha, rank_pattern, alpha_pattern and use_rslora",
            UserWarning,
            stacklevel=4,
        )
    saved = data.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        raise PeftFormatError(
            f"{where}: 'modules_to_save' is {saved!r}; expected a list of module names (or null)"
        )
    r = _field(data, "r", 8, (int,), where)
    alpha = _field(data, "lora_alpha", 8, (int, float), where)
    init = _init(data, where)
    return PeftSettings(
        r=r,
        lora_alpha=float(alpha),
        rank_pattern=_table(data, "rank_pattern", int, where),
        alpha_pattern=_table(data, "alpha_pattern", float, where),
        use_rslora=_field(data, "use_rslora", False, (bool,), where),
        lora_dropout=float(_field(data, "lora_dropout", 0.0, (int, float), where)),
        init=init,
        modules_to_save=tuple(saved),
        use_dora=data.get("use_dora") is True,
    )


def write(
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    *,
    rank: int,
    alpha: float,
    use_rslora: bool,
    dropout: float,
    init: str,
    target_modules: Sequence[str] | str,
    base_model_name_or_path: str | None,
    task_type: str | None,
    modules_to_save: Sequence[str] = (),
    use_dora: bool = False,
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict for modules with the given ranks and alphas.

    Only fields that PEFT has known since 0.9 are written, so older PEFT versions (which reject
    unknown keys) read the file too.
    """
    return {
        "peft_type": PEFT_TYPE,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": json_number(alpha),
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": target_modules,
        "rank_pattern": pattern_table(ranks, rank),
        "alpha_pattern": {k: json_number(v) for k, v in pattern_table(alphas, alpha).items()},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "modules_to_save": list(modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": use_dora,
    }
