"""`LoraConfig`: what to adapt and how, validated once, serialisable to JSON.

The scale of an adapter is ``alpha / rank`` (Hu et al. 2022), or ``alpha / sqrt(rank)`` with rsLoRA
(Kalajdzievski 2023), which keeps the update's magnitude stable as the rank grows.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import jax

from ._config_checks import (
    _check_alpha,
    _check_dtype,
    _check_layout,
    _check_rank,
    _is_real,
    _pattern_map,
    _patterns,
)
from ._errors import ConfigError
from ._match import PRESETS, is_module_name, matcher

InitScheme = Literal["gaussian", "kaiming_uniform"]
_INIT_SCHEMES = ("gaussian", "kaiming_uniform")

_LATER_DEFAULTS = {"trainable": (), "strict": True}


def trainable_matches(pattern: str, path: str) -> bool:
    """Whether one ``trainable`` pattern selects ``path``: a regex over the whole path, or a
    module name naming a module (at any depth) that holds the leaf."""
    return re.fullmatch(pattern, path) is not None or (
        is_module_name(pattern) and f"/{pattern}/" in "/" + path
    )


def _first_match(table: tuple[tuple[str, Any], ...], path: str) -> Any | None:
    for pattern, value in table:
        if re.fullmatch(pattern, path):
            return value
    return None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which weights get adapters, and their rank, scale, dropout, initialisation and dtype.

    Paths are the ``/``-joined keys of the parameter pytree (``decoder/layers_0/attn/query/kernel``);
    every pattern is a regular expression matched against the whole path (``re.fullmatch``).
    Per-path tables (``rank_pattern``, ``alpha_pattern``, ``layouts``) are searched in order and the
    first full match wins. The config is immutable and hashable, so it can be a static jit argument.

    Args:
        targets: what to adapt: regexes over the whole path, module names matched at any depth
            as PEFT's ``target_modules`` (``"query"`` selects every ``.../query/kernel``), or the
            preset ``"all-linear"`` (every linear layer but the output head, in the Flax
            transforms; every ``kernel`` leaf in the functional core). See :mod:`jlora._match`.
        rank: default rank ``r`` of each adapter.
        alpha: default ``alpha``; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        exclude: patterns (as ``targets``) removing paths from those ``targets`` selected.
        rank_pattern: per-path rank overrides, ``{regex: rank}``.
        alpha_pattern: per-path alpha overrides, ``{regex: alpha}``.
        dropout: LoRA dropout rate on the adapter's input, in ``[0, 1)``.
        init: ``"gaussian"`` (the paper's: ``a ~ N(0, 1/fan_in)``, ``b = 0``) or
            ``"kaiming_uniform"`` (``a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``b = 0``). Embedding
            tables are the other way round: ``a = 0`` and ``b`` random.
        use_rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
        dtype: dtype of the factors (``"float32"`` by default, whatever the base's dtype).
        layouts: per-path layout strings (see :class:`jlora.Layout`) for weights whose shape alone
            does not say which axes are stack, fan-in and fan-out (any weight with more than 2 axes).
        trainable: leaves to train in full beside the adapters (PEFT's ``modules_to_save``): a
            classifier head, a resized embedding. Regexes over the whole path, or module names
            selecting every leaf of each module so named at any depth (``"classifier"``). :func:`jlora.init` copies
            each into the adapter tree as a :class:`jlora.Trainable`, which replaces the base's leaf
            when the adapters are applied. A path may not be both targeted and trainable.
        strict: if True (the default), every target must match a path and every targeted weight
            must be adaptable. If False, targeted weights that cannot be adapted (biases, norms,
            unsupported layers, ambiguous shapes) are skipped and reported in one
            :class:`jlora.SkippedTargetsWarning`, and only the config as a whole must select
            something.

    Raises:
        ConfigError: if any field is invalid; the message names the field and the fix.

    Example:
        >>> config = LoraConfig(targets=r".*(query|value)/kernel", rank=4, alpha=8.0)
        >>> config.scale_for("layers_0/attn/query/kernel")
        2.0
        >>> LoraConfig.from_dict(config.to_dict()) == config
        True
        >>> head = LoraConfig(targets=".*attn/.*/kernel", trainable=("classifier",))
        >>> head.is_trainable("model/classifier/bias"), head.selects("model/classifier/kernel")
        (True, False)
    """

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0
    exclude: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    dropout: float = 0.0
    init: InitScheme = "gaussian"
    use_rslora: bool = False
    dtype: str = "float32"
    layouts: tuple[tuple[str, str], ...] = ()
    trainable: tuple[str, ...] = ()
    strict: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("targets", _patterns("targets", self.targets))
        if not self.targets:
            raise ConfigError(
                "LoraConfig.targets is empty; expected at least one regex, e.g. '.*/kernel' to adapt "
                "every Dense kernel"
            )
        if "" in self.targets:
            raise ConfigError(
                "LoraConfig.targets: '' is an empty pattern, which matches no parameter path; "
                "expected a regex or module name, e.g. '.*/kernel' to adapt every Dense kernel"
            )
        put("exclude", _patterns("exclude", self.exclude))
        put("trainable", _patterns("trainable", self.trainable))
        put("rank", _check_rank("LoraConfig.rank", self.rank))
        put("alpha", _check_alpha("LoraConfig.alpha", self.alpha))
        put("rank_pattern", _pattern_map("rank_pattern", self.rank_pattern, _check_rank))
        put("alpha_pattern", _pattern_map("alpha_pattern", self.alpha_pattern, _check_alpha))
        put("layouts", _pattern_map("layouts", self.layouts, _check_layout))
        dropout = self.dropout
        if not _is_real(dropout) or not 0 <= dropout < 1:
            raise ConfigError(
                f"LoraConfig.dropout: {dropout!r} is invalid; expected a rate in [0, 1) "
                "(0 turns LoRA dropout off)"
            )
        put("dropout", float(dropout))
        if self.init not in _INIT_SCHEMES:
            raise ConfigError(
                f"LoraConfig.init: {self.init!r} is unknown; expected one of {_INIT_SCHEMES}"
            )
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"LoraConfig.use_rslora: {self.use_rslora!r} is not a bool")
        put("dtype", _check_dtype(self.dtype))
        if not isinstance(self.strict, bool):
            raise ConfigError(f"LoraConfig.strict: {self.strict!r} is not a bool")

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at ``path`` (``rank_pattern`` first, then ``rank``)."""
        rank = _first_match(self.rank_pattern, path)
        return self.rank if rank is None else rank

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at ``path`` (``alpha_pattern`` first, then ``alpha``)."""
        alpha = _first_match(self.alpha_pattern, path)
        return self.alpha if alpha is None else alpha

    def scale_for(self, path: str) -> float:
        """The adapter's scale at ``path``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        rank = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(rank) if self.use_rslora else rank)

    def layout_for(self, path: str) -> str | None:
        """The layout string given for ``path`` in ``layouts``, or None."""
        return _first_match(self.layouts, path)

    def selects(self, path: str) -> bool:
        """Whether ``path`` matches a target and no exclusion (targets as in :mod:`jlora._match`:
        regexes, module names, the ``"all-linear"`` preset)."""
        if not matcher(self.targets)(path) or matcher(self.exclude)(path):
            return False
        # A preset never claims a leaf the config trains in full (the head beside all-linear).
        return not (self.trainable and self.by_preset_only(path) and self.is_trainable(path))

    def by_preset_only(self, path: str) -> bool:
        """Whether only a preset (``"all-linear"``) selects ``path``: the Flax transforms then
        adapt it only if its layer is linear and not the output head."""
        presets = [p for p in self.targets if p in PRESETS]
        others = tuple(p for p in self.targets if p not in presets)
        return bool(presets) and not matcher(others)(path)

    def is_trainable(self, path: str) -> bool:
        """Whether ``path`` is a leaf to train in full: a ``trainable`` regex matches the whole path,
        or a ``trainable`` module name (``"classifier"``, ``"model/head"``) names a module, at any
        depth, that holds the leaf (as PEFT's ``modules_to_save``: every leaf of the module)."""
        return any(trainable_matches(p, path) for p in self.trainable)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (tables as dicts, tuples as lists).

        Fields added after the first release are left out when they hold their defaults (no
        ``trainable``, ``strict=True``), so such configs stay readable by earlier jlora versions.
        """
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _LATER_DEFAULTS and value == _LATER_DEFAULTS[field.name]:
                continue
            if field.name in ("rank_pattern", "alpha_pattern", "layouts"):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Builds a config from :meth:`to_dict`'s output; unknown keys are warned about and dropped.

        Example:
            >>> LoraConfig.from_dict({"targets": [".*kernel"], "rank": 2}).rank
            2
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"LoraConfig.from_dict: ignoring unknown keys {unknown} (written by another version "
                "of jlora?)",
                UserWarning,
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        if "targets" not in kwargs:
            raise ConfigError("LoraConfig.from_dict: the dict has no 'targets'; it is required")
        for name in ("rank_pattern", "alpha_pattern", "layouts"):
            if name in kwargs and isinstance(kwargs[name], Mapping):
                kwargs[name] = tuple(kwargs[name].items())
        return cls(**kwargs)


# A config is static data: as a pytree with no leaves it can be an argument of jax.jit,
# jax.eval_shape and friends (`jax.eval_shape(jlora.init, key, params, config)`) without
# static_argnums; being hashable, it keys the compilation cache.
jax.tree_util.register_static(LoraConfig)
