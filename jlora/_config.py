"""`LoraConfig`: what to adapt and how, validated once, serialisable to JSON.

The scale of an adapter is ``alpha / rank`` (Hu et al. 2022), or ``alpha / sqrt(rank)`` with rsLoRA
(Kalajdzievski 2023), which keeps the update's magnitude stable as the rank grows.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from ._errors import ConfigError
from ._layout import Layout

InitScheme = Literal["gaussian", "kaiming_uniform"]
_INIT_SCHEMES = ("gaussian", "kaiming_uniform")


def _patterns(name: str, value: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ConfigError(
            f"LoraConfig.{name}: got {value!r}; expected a regular expression or a sequence of them, "
            f"e.g. {name}=('.*attn/(query|value)/kernel',)"
        )
    for pattern in value:
        _compile(name, pattern)
    return tuple(value)


def _compile(name: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"LoraConfig.{name}: {pattern!r} is not a valid regular expression ({e}); fix the "
            "pattern, or escape special characters with re.escape"
        ) from None


def _check_rank(where: str, rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ConfigError(f"{where}: rank {rank!r} is invalid; expected an integer >= 1")
    return int(rank)


def _check_alpha(where: str, alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)):
        raise ConfigError(f"{where}: alpha {alpha!r} is not a number; expected a float > 0")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(
            f"{where}: alpha {alpha!r} is invalid; expected a finite float > 0 (the adapter's "
            "scale is alpha / rank)"
        )
    return float(alpha)


def _pattern_map(name: str, value: Mapping[str, Any], check) -> tuple[tuple[str, Any], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"LoraConfig.{name}: got {value!r}; expected a mapping from path regex to value"
        )
    out = []
    for pattern, v in value.items():
        if not isinstance(pattern, str):
            raise ConfigError(
                f"LoraConfig.{name}: key {pattern!r} is not a regular expression string"
            )
        _compile(name, pattern)
        out.append((pattern, check(f"LoraConfig.{name}[{pattern!r}]", v)))
    return tuple(out)


def _check_layout(where: str, spec: Any) -> str:
    try:
        Layout.parse(spec)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return spec


def _check_dtype(dtype: Any) -> str:
    try:
        np_dtype = jnp.dtype(dtype)
    except TypeError:
        np_dtype = None
    if np_dtype is None or not jnp.issubdtype(np_dtype, jnp.floating):
        raise ConfigError(
            f"LoraConfig.dtype: {dtype!r} is not a floating dtype; expected e.g. 'float32' or "
            "'bfloat16'"
        )
    return np_dtype.name


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
        targets: regexes selecting the weights to adapt.
        rank: default rank ``r`` of each adapter.
        alpha: default ``alpha``; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        exclude: regexes removing paths from those ``targets`` selected.
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

    Raises:
        ConfigError: if any field is invalid; the message names the field and the fix.

    Example:
        >>> config = LoraConfig(targets=r".*(query|value)/kernel", rank=4, alpha=8.0)
        >>> config.scale_for("layers_0/attn/query/kernel")
        2.0
        >>> LoraConfig.from_dict(config.to_dict()) == config
        True
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

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("targets", _patterns("targets", self.targets))
        if not self.targets:
            raise ConfigError(
                "LoraConfig.targets is empty; expected at least one regex, e.g. '.*/kernel' to adapt "
                "every Dense kernel"
            )
        put("exclude", _patterns("exclude", self.exclude))
        put("rank", _check_rank("LoraConfig.rank", self.rank))
        put("alpha", _check_alpha("LoraConfig.alpha", self.alpha))
        put("rank_pattern", _pattern_map("rank_pattern", dict(self.rank_pattern), _check_rank))
        put("alpha_pattern", _pattern_map("alpha_pattern", dict(self.alpha_pattern), _check_alpha))
        put("layouts", _pattern_map("layouts", dict(self.layouts), _check_layout))
        dropout = self.dropout
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout < 1
        ):
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
        """Whether ``path`` matches a target and no exclusion."""
        return any(re.fullmatch(p, path) for p in self.targets) and not any(
            re.fullmatch(p, path) for p in self.exclude
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (tables as dicts, tuples as lists)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
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
