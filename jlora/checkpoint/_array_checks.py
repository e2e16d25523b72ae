"""The checks of an adapter checkpoint's arrays: the record against orbax's metadata, and each
restored array against its SHA-256 digest and for NaN/Inf (used by ``_restore``)."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from .. import _digest
from .._errors import DamagedCheckpointError, NonFiniteError
from .._paths import leaves_with_paths
from . import _format as fmt
from ._steps import ARRAYS, first_line


def _check_array_metadata(
    path: epath.Path,
    records: dict[str, fmt.AdapterRecord],
    extra_records: dict[str, fmt.ExtraRecord],
    magnitudes: dict[str, fmt.ExtraRecord],
) -> None:
    """Compares the record with orbax's own metadata of the arrays before reading any data."""
    failure = None
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(path / ARRAYS)
        found = {
            p: (tuple(m.shape), fmt.dtype_name(m.dtype))
            for p, m in leaves_with_paths(getattr(metadata, "tree", metadata))
        }
    except Exception as e:
        failure = f"{type(e).__name__}: {first_line(e)}"
    finally:
        handler.close()
    if failure is not None:
        raise DamagedCheckpointError(
            f"the checkpoint at {path} is damaged: the metadata of its arrays ({path / ARRAYS}) "
            f"cannot be read ({failure}). Restore an intact copy, or save the adapters again"
        )
    expected = {f"{p}/{n}": (getattr(r, f"{n}_shape"), getattr(r, f"{n}_dtype"))
                for p, r in records.items() for n in ("a", "b")}  # fmt: skip
    expected.update({p: (r.shape, r.dtype) for p, r in extra_records.items()})
    expected.update({f"{p}/m": (r.shape, r.dtype) for p, r in magnitudes.items()})
    for key in [*expected, *found]:
        if expected.get(key) != found.get(key):

            def show(entry: Any) -> str:
                return "nothing" if entry is None else f"shape {entry[0]} {entry[1]}"

            raise DamagedCheckpointError(
                f"the checkpoint at {path} is damaged: its record (jlora/metadata) gives {key} "
                f"{show(expected.get(key))} but its arrays hold {show(found.get(key))}; the "
                "record and the arrays come from different saves. Restore an intact copy, or save "
                "the adapters again"
            )


def _unreadable(path: epath.Path, failure: str) -> DamagedCheckpointError:
    """The error of a checkpoint whose arrays orbax could not read (``failure``: why)."""
    return DamagedCheckpointError(
        f"the checkpoint at {path} is damaged: its arrays ({path / ARRAYS}) cannot be read "
        f"({failure}). A file is missing, truncated or corrupt; restore an intact copy, or "
        "save the adapters again"
    )


def _verify(
    path: epath.Path,
    flat: dict[str, Any],
    records: dict[str, fmt.AdapterRecord],
    extra_records: dict[str, fmt.ExtraRecord],
    digests: dict[str, dict[str, str]],
    check_finite: bool,
    magnitudes: dict[str, fmt.ExtraRecord],
) -> None:
    """Checks restored arrays against their recorded digests, and (optionally) for NaN/Inf."""
    keys = [(p, n, f"{p}/{n}") for p in records for n in ("a", "b")]
    keys += [(p, "m", f"{p}/m") for p in magnitudes]
    keys += [(p, "value", p) for p in extra_records]
    for p, name, key in keys:
        expected = digests.get(p, {}).get(name)
        if expected is not None and _digest.array_digest(flat[key]) != expected:
            raise DamagedCheckpointError(
                f"the checkpoint at {path} is damaged: {key} differs from the SHA-256 digest "
                "recorded when it was saved (orbax checksums its index, not the array data). "
                "Restore an intact copy, or save the adapters again"
            )
        if check_finite:
            bad = _digest.count_nonfinite(flat[key])
            if bad:
                raise NonFiniteError(
                    f"{key}: the checkpoint at {path} holds {bad} NaN or infinite values here; "
                    "merging would put NaN/Inf into the model. Were they saved from a diverged "
                    "run? Pass check_finite=False to restore them anyway"
                )
