"""The checks of :class:`jlora.LoraConfig`'s fields: each returns the field's normalised value
(patterns as tuples, tables as ``((pattern, value), ...)``, a dtype as its name) or raises
:class:`jlora.ConfigError` naming the field, what was wrong and how to fix it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._errors import ConfigError
from ._layout import Layout


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


def _is_real(value: Any) -> bool:
    """A real number: Python or NumPy int or float, not bool and not complex."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)
    )


def _check_alpha(where: str, alpha: Any) -> float:
    if not _is_real(alpha):
        raise ConfigError(
            f"{where}: alpha {alpha!r} is not a number; expected a real float > 0"
            + (" (a complex one would be read as its real part)" if np.iscomplexobj(alpha) else "")
        )
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(
            f"{where}: alpha {alpha!r} is invalid; expected a finite float > 0 (the adapter's "
            "scale is alpha / rank)"
        )
    return float(alpha)


def _pairs(name: str, value: Any) -> dict[str, Any]:
    # A mapping, or the tuple of (pattern, value) pairs a config stores; never a list of strings
    # (dict(["io"]) would silently read the 2-letter string as a pair).
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (tuple, list)) and all(
        isinstance(item, (tuple, list)) and len(item) == 2 for item in value
    ):
        return dict(value)
    example = "'ioo'" if name == "layouts" else "..."
    raise ConfigError(
        f"LoraConfig.{name}: got {value!r}; expected a mapping from path regex to value, e.g. "
        f"{name}={{'.*attn/query/kernel': {example}}}"
    )


def _pattern_map(name: str, value: Any, check) -> tuple[tuple[str, Any], ...]:
    value = _pairs(name, value)
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
