"""Restoring an adapter checkpoint onto the host in one read of its arrays, for the merge on disk.

:func:`jlora.checkpoint.restore` first compares the record with orbax's metadata of the arrays
(which opens every array) and then reads them onto devices (which opens every array again, and
places each one): for a base of a thousand small leaves that is a few thousand openings before the
first base leaf is read. ``merge_checkpoint`` needs the factors on the host only, so
:func:`restore_on_host` makes one read, as NumPy arrays, of exactly the keys the record names, and
compares what came back with the record; the structure must match the stored one, or orbax
refuses the read before touching any data. Only when the read fails or an array's shape or dtype
differs from the record does it ask orbax for the metadata, through ``restore``'s own check, so
every refusal names the same key in the same words as :func:`jlora.checkpoint.restore`; the
remaining checks (fingerprint, digests, NaN/Inf, fit to the base) are ``restore``'s, in its order.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from .. import _checks, _dirs
from .._extras import Trainable
from .._factors import LoraFactors
from .._paths import leaves_with_paths, nest
from . import _base
from . import _format as fmt
from . import _magnitudes as mag
from . import _parse
from ._steps import ARRAYS, PathLike, first_line, read_record, resolve
from ._array_checks import _check_array_metadata, _unreadable, _verify


def restore_on_host(
    directory: PathLike, *, step: int | None, base: Any, check_finite: bool
) -> tuple[dict[str, LoraFactors], dict[str, Trainable], _parse.Record]:
    """``({path: LoraFactors}, {path: Trainable}, record)`` of the checkpoint, arrays in NumPy.

    Checks and refuses as ``restore(directory, step=step, base=base, check_finite=check_finite)``
    does; ``base`` is the base's abstract tree (shapes and dtypes).
    """
    path = resolve(_dirs.absolute(_checks.path(directory, "directory")), step)
    _checks.flag(check_finite, "check_finite")
    rec = _parse.parse(read_record(path), str(path))
    if rec.magnitudes:
        mag.refuse_unasked(str(path), list(rec.magnitudes))
    if rec.base is not None:
        _base.check_fingerprint(rec.base, base)
        _base.check_digests(rec.base_digests, base)
    flat = _read_once(path, rec)
    _verify(path, flat, rec.adapters, rec.extras, rec.digests, check_finite, {})
    table = {
        p: LoraFactors(flat[f"{p}/a"], flat[f"{p}/b"], rec.config.scale_for(p), r.layout)
        for p, r in rec.adapters.items()
    }
    extras = {p: Trainable(flat[p]) for p in rec.extras}
    fmt.check_base_fit(table, base, extras)
    return table, extras, rec


def _read_once(path: epath.Path, rec: _parse.Record) -> dict[str, np.ndarray]:
    expected = {f"{p}/{n}": (getattr(r, f"{n}_shape"), getattr(r, f"{n}_dtype"))
                for p, r in rec.adapters.items() for n in ("a", "b")}  # fmt: skip
    expected.update({p: (r.shape, r.dtype) for p, r in rec.extras.items()})
    # The item gives the structure (which orbax compares with the stored one before reading);
    # a NumPy restore reads each array in its stored shape and dtype, whatever the item says.
    item = {k: np.broadcast_to(np.zeros((), jnp.dtype(d)), s) for k, (s, d) in expected.items()}
    args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in expected}
    failure, flat = None, {}
    handler = ocp.PyTreeCheckpointHandler()
    try:
        restored = handler.restore(
            path / ARRAYS, args=ocp.args.PyTreeRestore(item=nest(item), restore_args=nest(args))
        )
        flat = dict(leaves_with_paths(restored))
    except Exception as e:
        failure = f"{type(e).__name__}: {first_line(e)}"
    finally:
        handler.close()
    found = {k: (tuple(np.shape(x)), fmt.dtype_name(np.asarray(x).dtype)) for k, x in flat.items()}
    if failure is not None or found != expected:
        # restore's own comparison, from orbax's metadata: names the first differing key.
        _check_array_metadata(path, rec.adapters, rec.extras, {})
        if failure is None:  # pragma: no cover - orbax's metadata and its read disagree
            failure = "the arrays read differ from orbax's metadata of them"
        raise _unreadable(path, failure)
    return {k: np.asarray(x) for k, x in flat.items()}
