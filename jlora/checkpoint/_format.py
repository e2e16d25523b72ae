"""The JSON record saved next to the factors of an adapter checkpoint, and the base fingerprint.

An adapter checkpoint holds two orbax items: ``adapters``, the arrays as a nested dict
``{...: {"a": a, "b": b}}`` mirroring the parameter paths, and ``jlora``, this JSON record::

    {"format": "jlora.adapters", "version": 1,
     "config": LoraConfig.to_dict(),
     "adapters": {path: {"layout": {...}, "a": {"shape", "dtype"}, "b": {"shape", "dtype"}}},
     "base": [[path, shape, dtype], ...] or null,
     "digests": {path: {"a": sha256, "b": sha256} or {"value": sha256}},
     "base_digests": {path: sha256} (when the base's values were given)}

Adapters with trainable extras (:class:`jlora.Trainable`) are saved as version 2, which adds
``"trainable": {path: {"shape", "dtype"}}``; each extra's array sits in the arrays item at its own
path. Version 2 is written only when there are extras, so every other checkpoint stays readable by
jlora versions that know version 1 alone, and those refuse (rather than silently drop) extras.
Adapters saved with DoRA magnitudes are version 3 (``_magnitudes``), which adds
``"magnitudes": {path: {"shape", "dtype"}}`` and an ``m`` array beside each adapter's ``a``, ``b``.

Scales are not stored: they follow from the config (``config.scale_for(path)``), which ``save``
checks. The base fingerprint and its digests are described in ``_base``. ``digests`` holds a
SHA-256 of each saved array (orbax checksums its index, not the array data), which ``restore``
verifies; ``digests`` and ``base_digests`` are optional keys, so jlora versions that predate them
read these checkpoints, and checkpoints without them restore unverified.

``_parse`` reads a record back, validated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .. import _digest
from .._config import LoraConfig
from .._errors import AdapterMismatchError
from .._extras import Trainable, check_extra_fit
from .._factors import LoraFactors
from .._layout import Layout
from .._merge import adapter_tables, check_fit
from .._paths import leaves_with_paths
from . import _base
from . import _magnitudes as mag
from ._base import dtype_name

FORMAT = "jlora.adapters"
VERSION = 1
VERSION_EXTRAS = 2


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    """What the JSON record says about one adapter: layout and factor shapes and dtypes."""

    layout: Layout
    a_shape: tuple[int, ...]
    a_dtype: str
    b_shape: tuple[int, ...]
    b_dtype: str


@dataclasses.dataclass(frozen=True)
class ExtraRecord:
    """What the JSON record says about one trainable extra: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: str


def _layout_record(layout: Layout) -> dict[str, Any]:
    # `order` is written only when set, so checkpoints of canonical layouts stay readable by
    # jlora versions that predate it.
    record = dataclasses.asdict(layout)
    if not record["order"]:
        del record["order"]
    return record


def check_adapters(
    adapters: Any, config: LoraConfig, base: Any | None
) -> tuple[dict[str, LoraFactors], dict[str, Trainable]]:
    """Validates adapters against their config (and base) before anything is written."""
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"config: got a {type(config).__name__}; expected the jlora.LoraConfig the adapters "
            "were made with"
        )
    table, extras = adapter_tables(adapters)
    if not table and not extras:
        raise AdapterMismatchError(
            "adapters: the tree holds no LoraFactors; expected the output of jlora.init"
        )
    for path, extra in extras.items():
        if not (hasattr(extra.value, "shape") and hasattr(extra.value, "dtype")):
            raise AdapterMismatchError(
                f"{path}: trainable extra is a {type(extra.value).__name__}, not an array; "
                "expected concrete arrays to save"
            )
        if not config.is_trainable(path):
            raise AdapterMismatchError(
                f"{path}: the adapters hold a trainable extra here but the config's trainable "
                f"{list(config.trainable)} does not select this path; save the LoraConfig these "
                "adapters were made with"
            )
    for path, f in table.items():
        for name in ("a", "b"):
            leaf = getattr(f, name)
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
                raise AdapterMismatchError(
                    f"{path}: factor {name} is a {type(leaf).__name__}, not an array; expected "
                    "concrete arrays to save"
                )
        stack = f.a.ndim - 1 - f.layout.fan_in_ndim
        if stack < 0 or f.b.shape[: stack + 1] != (*f.a.shape[:stack], f.rank):
            raise AdapterMismatchError(
                f"{path}: factors a {tuple(f.a.shape)} and b {tuple(f.b.shape)} are inconsistent "
                f"with layout {f.layout}; expected a (*stack, *fan_in, r) and b (*stack, r, "
                "*fan_out)"
            )
        expected = config.scale_for(path)
        if not config.selects(path) or not math.isclose(f.scale, expected, rel_tol=1e-9):
            raise AdapterMismatchError(
                f"{path}: the adapter has scale {f.scale} but the config "
                + (
                    "does not target this path"
                    if not config.selects(path)
                    else f"gives scale {expected} (alpha / rank)"
                )
                + "; save the LoraConfig these adapters were made with"
            )
    if base is not None:
        check_base_fit(table, base, extras)
    return table, extras


def check_base_fit(
    table: Mapping[str, LoraFactors], base: Any, extras: Mapping[str, Any] | None = None
) -> None:
    """Raises :class:`AdapterMismatchError` if an adapter has no weight in ``base`` or misfits it."""
    weights = dict(leaves_with_paths(base))
    for path, f in [*table.items(), *(extras or {}).items()]:
        if path not in weights:
            what = "factors" if path in table else "a trainable extra"
            raise AdapterMismatchError(
                f"{path}: the adapters have {what} at this path but base has no such weight. "
                "Were these adapters made for another model?"
            )
        if isinstance(f, Trainable):
            check_extra_fit(path, weights[path], f)
        else:
            check_fit(path, weights[path], f)


def record(
    table: Mapping[str, LoraFactors],
    config: LoraConfig,
    base: Any | None,
    extras: Mapping[str, Trainable] | None = None,
    base_digest: bool = True,
    magnitudes: Mapping[str, Any] | None = None,
) -> dict:
    """The JSON record for validated adapters (version 2 with trainable extras, 3 with DoRA
    magnitudes)."""
    digests: dict[str, dict[str, str]] = {
        path: {"a": _digest.array_digest(f.a), "b": _digest.array_digest(f.b)}
        for path, f in table.items()
    }
    for path, e in (extras or {}).items():
        digests[path] = {"value": _digest.array_digest(e.value)}
    for path, m in (magnitudes or {}).items():
        digests[path]["m"] = _digest.array_digest(m)
    version = VERSION_EXTRAS if extras else VERSION
    out = {
        "format": FORMAT,
        "version": mag.VERSION_MAGNITUDES if magnitudes else version,
        "config": config.to_dict(),
        "adapters": {
            path: {
                "layout": _layout_record(f.layout),
                "a": {"shape": list(f.a.shape), "dtype": dtype_name(f.a.dtype)},
                "b": {"shape": list(f.b.shape), "dtype": dtype_name(f.b.dtype)},
            }
            for path, f in table.items()
        },
        "base": None if base is None else [list(e) for e in _base.fingerprint(base)],
        "digests": digests,
    }
    if base is not None and base_digest:
        saved = _base.digests(base)
        if saved is not None:
            out["base_digests"] = saved
    if extras:
        out["trainable"] = {
            path: {"shape": list(e.value.shape), "dtype": dtype_name(e.value.dtype)}
            for path, e in extras.items()
        }
    if magnitudes:
        out["magnitudes"] = {
            path: {"shape": list(m.shape), "dtype": dtype_name(m.dtype)}
            for path, m in magnitudes.items()
        }
    return out
