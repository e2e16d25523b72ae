"""The JSON record saved next to the factors of an adapter checkpoint, and the base fingerprint.

An adapter checkpoint holds two orbax items: ``adapters``, the arrays as a nested dict
``{...: {"a": a, "b": b}}`` mirroring the parameter paths, and ``jlora``, this JSON record::

    {"format": "jlora.adapters", "version": 1,
     "config": LoraConfig.to_dict(),
     "adapters": {path: {"layout": {...}, "a": {"shape", "dtype"}, "b": {"shape", "dtype"}}},
     "base": [[path, shape, dtype], ...] or null}

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
from ._factors import LoraFactors
from ._layout import Layout
from ._merge import check_fit, factors_by_path
from ._paths import leaves_with_paths

FORMAT = "jlora.adapters"
VERSION = 1

Fingerprint = list[tuple[str, tuple[int, ...], str]]


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    """What the JSON record says about one adapter: layout and factor shapes and dtypes."""

    layout: Layout
    a_shape: tuple[int, ...]
    a_dtype: str
    b_shape: tuple[int, ...]
    b_dtype: str


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


def check_adapters(adapters: Any, config: LoraConfig, base: Any | None) -> dict[str, LoraFactors]:
    """Validates adapters against their config (and base) before anything is written."""
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"config: got a {type(config).__name__}; expected the jlora.LoraConfig the adapters "
            "were made with"
        )
    table = factors_by_path(adapters)
    if not table:
        raise AdapterMismatchError(
            "adapters: the tree holds no LoraFactors; expected the output of jlora.init"
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
        check_base_fit(table, base)
    return table


def check_base_fit(table: Mapping[str, LoraFactors], base: Any) -> None:
    """Raises :class:`AdapterMismatchError` if an adapter has no weight in ``base`` or misfits it."""
    weights = dict(leaves_with_paths(base))
    for path, f in table.items():
        if path not in weights:
            raise AdapterMismatchError(
                f"{path}: the adapters have factors at this path but base has no such weight. "
                "Were these adapters made for another model?"
            )
        check_fit(path, weights[path], f)


def record(table: Mapping[str, LoraFactors], config: LoraConfig, base: Any | None) -> dict:
    """The JSON record for validated adapters."""
    return {
        "format": FORMAT,
        "version": VERSION,
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


def parse(data: Any, where: str) -> tuple[LoraConfig, dict[str, AdapterRecord], Fingerprint | None]:
    """Reads a JSON record back: the config, each adapter's record, and the base fingerprint."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(
            f"{where}: not a jlora adapter checkpoint (its 'jlora' item has no "
            f"format={FORMAT!r}); expected a directory written by jlora.checkpoint.save"
        )
    if data.get("version") != VERSION:
        raise ValueError(
            f"{where}: adapter checkpoint format version {data.get('version')!r} is not supported "
            f"by this jlora (it reads version {VERSION}); upgrade jlora"
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
    base = data.get("base")
    saved = None if base is None else [(p, tuple(s), d) for p, s, d in base]
    return config, adapters, saved
