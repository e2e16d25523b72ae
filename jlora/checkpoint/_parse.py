"""Reading an adapter checkpoint's JSON record back (its format: ``_format``), validated.

:func:`parse` validates a record completely (types, shapes against layouts, floating-point
dtypes) before anything is read with it, so a damaged or hand-edited record fails with its file
named rather than restoring cast or misshapen factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._config import LoraConfig
from .._errors import DamagedCheckpointError
from .._layout import Layout
from . import _magnitudes as mag
from ._base import Fingerprint
from ._format import FORMAT, VERSION, VERSION_EXTRAS, AdapterRecord, ExtraRecord


@dataclasses.dataclass(frozen=True)
class Record:
    """A parsed, validated JSON record (see the module docstring)."""

    config: LoraConfig
    adapters: dict[str, AdapterRecord]
    extras: dict[str, ExtraRecord]
    base: Fingerprint | None
    digests: dict[str, dict[str, str]]
    base_digests: dict[str, str] | None
    magnitudes: dict[str, ExtraRecord] = dataclasses.field(default_factory=dict)


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
    ):
        raise ValueError(f"{what} shape {value!r} is not a list of integers >= 0")
    return tuple(value)


def _float_dtype(value: Any, what: str) -> str:
    try:
        dtype = np.dtype(value) if isinstance(value, str) else None
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{what} dtype {value!r} is not a floating-point dtype (factors and trained leaves "
            "are float32, bfloat16, ...; restoring would cast them)"
        )
    return dtype.name


def _layout(entry: Any, what: str) -> Layout:
    if not isinstance(entry, Mapping) or set(entry) - {
        "fan_in_ndim",
        "fan_out_ndim",
        "embedding",
        "order",
    }:
        raise ValueError(f"{what} layout {entry!r} is not a layout record")
    fan_in, fan_out = entry.get("fan_in_ndim"), entry.get("fan_out_ndim")
    embedding, order = entry.get("embedding", False), entry.get("order", "")
    if not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (fan_in, fan_out)
    ):
        raise ValueError(f"{what} layout {dict(entry)!r} needs fan_in_ndim and fan_out_ndim >= 1")
    if not isinstance(embedding, bool) or not isinstance(order, str) or (embedding and fan_in != 1):
        raise ValueError(f"{what} layout {dict(entry)!r} is not a valid layout")
    return Layout(fan_in, fan_out, embedding, order)


def _adapter_record(path: str, entry: Any) -> AdapterRecord:
    if not isinstance(entry, Mapping) or not all(
        isinstance(entry.get(k), Mapping) for k in ("a", "b")
    ):
        raise ValueError(f"adapter {path!r} has record {entry!r}; expected layout, a and b")
    layout = _layout(entry.get("layout"), f"adapter {path!r}")
    a_shape = _shape(entry["a"].get("shape"), f"adapter {path!r} factor a")
    b_shape = _shape(entry["b"].get("shape"), f"adapter {path!r} factor b")
    stack = len(a_shape) - 1 - layout.fan_in_ndim
    if (
        stack < 0
        or len(b_shape) != stack + 1 + layout.fan_out_ndim
        or b_shape[: stack + 1] != (*a_shape[:stack], a_shape[-1])
        or a_shape[-1] < 1
    ):
        raise ValueError(
            f"adapter {path!r} has factors a {a_shape}, b {b_shape}, which do not fit its layout "
            f"{layout} (a (*stack, *fan_in, r), b (*stack, r, *fan_out))"
        )
    return AdapterRecord(
        layout=layout,
        a_shape=a_shape,
        a_dtype=_float_dtype(entry["a"].get("dtype"), f"adapter {path!r} factor a"),
        b_shape=b_shape,
        b_dtype=_float_dtype(entry["b"].get("dtype"), f"adapter {path!r} factor b"),
    )


def _parse_fields(data: Mapping[str, Any]) -> Record:
    config = LoraConfig.from_dict(data["config"])
    if not isinstance(data["adapters"], Mapping):
        raise ValueError(f"'adapters' is {data['adapters']!r}; expected a dict")
    adapters = {path: _adapter_record(path, e) for path, e in data["adapters"].items()}
    extras = {}
    for path, entry in (data.get("trainable") or {}).items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"trainable {path!r} has record {entry!r}; expected shape and dtype")
        extras[path] = ExtraRecord(
            shape=_shape(entry.get("shape"), f"trainable {path!r}"),
            dtype=_float_dtype(entry.get("dtype"), f"trainable {path!r}"),
        )
    magnitudes = {}
    for path, entry in (data.get("magnitudes") or {}).items():
        if path not in adapters or not isinstance(entry, Mapping):
            raise ValueError(f"magnitude {path!r} has record {entry!r} but no adapter record")
        r = adapters[path]
        shape = _shape(entry.get("shape"), f"magnitude {path!r}")
        if shape != mag.expected_shape(r.b_shape, len(r.a_shape) - 1 - r.layout.fan_in_ndim):
            raise ValueError(f"magnitude {path!r} has shape {shape}, which does not fit {r.b_shape}")
        dtype = _float_dtype(entry.get("dtype"), f"magnitude {path!r}")
        magnitudes[path] = ExtraRecord(shape, dtype)
    base = data.get("base")
    saved = None if base is None else [(str(p), tuple(s), str(d)) for p, s, d in base]
    digests = data.get("digests") or {}
    base_digests = data.get("base_digests")
    if not isinstance(digests, Mapping) or not all(
        isinstance(v, Mapping) and all(isinstance(h, str) for h in v.values())
        for v in digests.values()
    ):
        raise ValueError(f"'digests' is not a dict of {{path: {{name: sha256}}}}: {digests!r}")
    if base_digests is not None and not (
        isinstance(base_digests, Mapping) and all(isinstance(h, str) for h in base_digests.values())
    ):
        raise ValueError("'base_digests' is not a dict of {path: sha256}")
    return Record(config, adapters, extras, saved, dict(digests), base_digests, magnitudes)


def parse(data: Any, where: str) -> Record:
    """Reads a JSON record back, validated: config, adapter and extra records, base, digests.

    Raises:
        ValueError: not a jlora record, or of a newer version.
        DamagedCheckpointError: the record is malformed (names the file and the entry).
    """
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(
            f"{where}: not a jlora adapter checkpoint (its 'jlora' item has no "
            f"format={FORMAT!r}); expected a directory written by jlora.checkpoint.save"
        )
    if data.get("version") not in (VERSION, VERSION_EXTRAS, mag.VERSION_MAGNITUDES):
        raise ValueError(
            f"{where}: adapter checkpoint format version {data.get('version')!r} is not supported "
            f"by this jlora (it reads versions {VERSION} to {mag.VERSION_MAGNITUDES}); upgrade "
            "jlora"
        )
    try:
        return _parse_fields(data)
    except (KeyError, TypeError, ValueError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise DamagedCheckpointError(
            f"the checkpoint at {where} is damaged: its record (jlora/metadata) is malformed: "
            f"{what}. Restore an intact copy, or save the adapters again"
        ) from None
