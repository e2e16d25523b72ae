"""The JSON record saved next to the factors of an adapter checkpoint, and the base fingerprint.

An adapter checkpoint holds two orbax items: ``adapters``, the arrays as a nested dict
``{...: {"a": a, "b": b}}`` mirroring the parameter paths, and ``jlora``, this JSON record::

    {"format": "jlora.adapters", "version": 1,
     "config": LoraConfig.to_dict(),
     "adapters": {path: {"layout": {...}, "a": {"shape", "dtype"}, "b": {"shape", "dtype"}}},
     "base": [[path, shape, dtype], ...] or null}

Adapters with trainable extras (:class:`jlora.Trainable`) are saved as version 2, which adds
``"trainable": {path: {"shape", "dtype"}}``; each extra's array sits in the arrays item at its own
path. Version 2 is written only when there are extras, so every other checkpoint stays readable by
jlora versions that know version 1 alone, and those refuse (rather than silently drop) extras.

Scales are not stored: they follow from the config (``config.scale_for(path)``), which ``save``
checks. The base fingerprint lists every leaf of at least one axis (the weights; scalars such as a
step counter are left out) so that adapters restored onto another model fail with the first
differing path rather than a shape error deep inside XLA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._config import LoraConfig
from ._errors import AdapterMismatchError
from ._extras import Trainable, check_extra_fit
from ._factors import LoraFactors
from ._layout import Layout
from ._merge import adapter_tables, check_fit
from ._paths import leaves_with_paths

FORMAT = "jlora.adapters"
VERSION = 1
VERSION_EXTRAS = 2

Fingerprint = list[tuple[str, tuple[int, ...], str]]


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


def dtype_name(dtype: Any) -> str:
    """A dtype as the string ``np.dtype`` reads back (``"bfloat16"`` included, via ml_dtypes)."""
    return np.dtype(dtype).name


def fingerprint(base: Any) -> Fingerprint:
    """``[(path, shape, dtype), ...]`` of every leaf of ``base`` with at least one axis, in order.

    Leaves may be arrays, ``jax.ShapeDtypeStruct`` or orbax array metadata.
    """
    out = []
    for path, leaf in leaves_with_paths(base):
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None or len(shape) == 0:
            continue
        out.append((path, tuple(int(n) for n in shape), dtype_name(dtype)))
    return out


def _describe(entry: tuple[tuple[int, ...], str] | None) -> str:
    return "no such leaf" if entry is None else f"shape {entry[0]} {entry[1]}"


def check_fingerprint(saved: Fingerprint, base: Any) -> None:
    """Raises :class:`AdapterMismatchError` at the first path where ``base`` differs from ``saved``."""
    found = {path: (shape, dtype) for path, shape, dtype in fingerprint(base)}
    expected = {path: (tuple(shape), dtype) for path, shape, dtype in saved}
    order = [p for p, _, _ in saved] + [p for p in found if p not in expected]
    differing = [p for p in order if found.get(p) != expected.get(p)]
    if differing:
        path = differing[0]
        raise AdapterMismatchError(
            f"{path}: the base given has {_describe(found.get(path))} but the adapters were saved "
            f"for a base with {_describe(expected.get(path))} ({len(differing)} differing paths). "
            "Were these adapters made for another model? Restore them with the base they were "
            "trained on, or without base= to skip this check"
        )


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
) -> dict:
    """The JSON record for validated adapters (version 2 when there are trainable extras)."""
    out = {
        "format": FORMAT,
        "version": VERSION_EXTRAS if extras else VERSION,
        "config": config.to_dict(),
        "adapters": {
            path: {
                "layout": _layout_record(f.layout),
                "a": {"shape": list(f.a.shape), "dtype": dtype_name(f.a.dtype)},
                "b": {"shape": list(f.b.shape), "dtype": dtype_name(f.b.dtype)},
            }
            for path, f in table.items()
        },
        "base": None if base is None else [list(entry) for entry in fingerprint(base)],
    }
    if extras:
        out["trainable"] = {
            path: {"shape": list(e.value.shape), "dtype": dtype_name(e.value.dtype)}
            for path, e in extras.items()
        }
    return out


def parse(
    data: Any, where: str
) -> tuple[LoraConfig, dict[str, AdapterRecord], dict[str, ExtraRecord], Fingerprint | None]:
    """Reads a JSON record back: the config, each adapter's and extra's record, the fingerprint."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(
            f"{where}: not a jlora adapter checkpoint (its 'jlora' item has no "
            f"format={FORMAT!r}); expected a directory written by jlora.checkpoint.save"
        )
    if data.get("version") not in (VERSION, VERSION_EXTRAS):
        raise ValueError(
            f"{where}: adapter checkpoint format version {data.get('version')!r} is not supported "
            f"by this jlora (it reads versions {VERSION} and {VERSION_EXTRAS}); upgrade jlora"
        )
    config = LoraConfig.from_dict(data["config"])
    adapters = {
        path: AdapterRecord(
            layout=Layout(**entry["layout"]),
            a_shape=tuple(entry["a"]["shape"]),
            a_dtype=entry["a"]["dtype"],
            b_shape=tuple(entry["b"]["shape"]),
            b_dtype=entry["b"]["dtype"],
        )
        for path, entry in data["adapters"].items()
    }
    extras = {
        path: ExtraRecord(shape=tuple(entry["shape"]), dtype=entry["dtype"])
        for path, entry in (data.get("trainable") or {}).items()
    }
    base = data.get("base")
    saved = None if base is None else [(p, tuple(s), d) for p, s, d in base]
    return config, adapters, extras, saved
