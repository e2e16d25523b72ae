"""`merge_checkpoint` onto a quantised base on disk, one weight at a time.

The base is a quantised params tree saved by :func:`jlora.quant.save`: an orbax PyTree checkpoint
whose ``jlora_quant.json`` holds each :class:`QuantizedWeight`'s kind, shape, dtype, block size and
axes (orbax stores only the arrays, and NF4 and int4 codes look the same there). A checkpoint that
orbax alone wrote (``ocp.StandardCheckpointer().save(dir, qparams)``) has no such file: then
``like``, the quantised tree's structure (``jax.eval_shape`` of the ``quantize`` call costs
nothing), supplies the metadata; given with a ``jlora_quant.json`` it must agree with it. Every
array on disk is checked against the metadata, and the base is read a group of weights at a time
with orbax's partial restore. Each weight is merged by :func:`jlora.quant.merge` itself, so
the output equals the in-memory merge bit for bit; it is written with orbax's partial saving
into a journalled scratch directory (with its own ``jlora_quant.json``, so a re-quantised
output restores with :func:`jlora.quant.restore`) and renamed into place once complete, with the
same rules as :func:`jlora.checkpoint.merge_checkpoint` (whose private helpers this module reuses).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .. import _atomic, _checks, _digest, _dirs
from .._errors import AdapterMismatchError
from .._paths import nest, path_to_str
from ..checkpoint import _base
from ..checkpoint import _disk_merge as dm
from ..checkpoint._steps import PathLike
from ..checkpoint._host_restore import restore_on_host
from ..checkpoint._leaf_io import _Leaf
from . import _store
from ._merge import RequantizationError, merge
from ._weight import QuantizedWeight, dequantize

_FIELDS = ("codes", "scales", "scale_scales", "scale_offset")


def _is_q(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One weight of ``like``: its path and the arrays it is stored as (``{disk path: like}``)."""

    path: str
    like: Any
    arrays: dict[str, Any]
    nbytes: int = 0  # on disk, for grouping


def _units(like: Any, disk: dict[str, _Leaf], base: Any) -> list[_Unit]:
    units = []
    for key_path, x in jax.tree_util.tree_flatten_with_path(like, is_leaf=_is_q)[0]:
        path = path_to_str(key_path)
        if _is_q(x):
            arrays = {f"{path}/{f}": getattr(x, f) for f in _FIELDS if getattr(x, f) is not None}
        else:
            arrays = {path: x}
        nbytes = sum(disk[p].nbytes for p in arrays if p in disk)
        units.append(_Unit(path, x, arrays, nbytes))
    expected = {p: a for u in units for p, a in u.arrays.items()}
    for p, a in expected.items():
        leaf = disk.get(p)
        want = (tuple(np.shape(a)), np.dtype(a.dtype).name)
        got = None if leaf is None else (tuple(leaf.meta.shape), np.dtype(leaf.meta.dtype).name)
        if got != want:
            found = "is missing" if leaf is None else f"has shape {got[0]} and dtype {got[1]}"
            raise AdapterMismatchError(
                f"{p}: the base checkpoint {base} {found} but like expects shape {want[0]} and "
                f"dtype {want[1]}; pass as like the quantised tree this checkpoint was saved from "
                "(same kind, block size and double quantisation), e.g. jax.eval_shape of the "
                "jlora.quant.quantize call"
            )
    extra = sorted(set(disk) - set(expected))
    if extra:
        raise AdapterMismatchError(
            f"{extra[0]}: the base checkpoint {base} holds {len(extra)} arrays like does not "
            f"({extra[:3]}); pass as like the quantised tree this checkpoint was saved from"
        )
    return units


def merge_checkpoint(
    base_dir: PathLike,
    adapter_dir: PathLike,
    out_dir: PathLike,
    *,
    like: Any = None,
    dtype: Any = jnp.bfloat16,
    requantize: bool = False,
    overwrite: bool = False,
    force: bool = False,
    adapter_step: int | None = None,
    group_bytes: int = dm.DEFAULT_GROUP_BYTES,
    check_finite: bool = True,
    base_digest: bool = True,
) -> Any:
    """Folds an adapter checkpoint into a quantised base checkpoint on disk (see the module doc).

    Each quantised weight becomes ``dtype(f32(dequantize(q)) + scale * a @ b)`` (or, with
    ``requantize``, that weight quantised again with its own kind and options); float leaves merge
    as in :func:`jlora.merge` or are copied. The output is an orbax PyTree checkpoint with its
    ``jlora_quant.json`` (of float weights, or of the re-quantised tree: restore it with
    :func:`jlora.quant.restore`), assembled in a scratch directory beside ``out_dir`` and renamed
    into place only when complete.

    Args:
        base_dir: a quantised params tree saved by :func:`jlora.quant.save` (or by orbax alone,
            then with ``like``).
        adapter_dir: an adapter checkpoint from :func:`jlora.checkpoint.save`.
        out_dir: where to write the merged checkpoint; neither an input nor inside one.
        like: optional where the base has its ``jlora_quant.json``, which it is then checked
            against: the quantised tree the base was saved from, or its ``jax.eval_shape``; only
            its structure and :class:`QuantizedWeight` metadata are used.
        dtype: the float dtype of merged quantised weights.
        requantize: re-quantise the merged weights and report the error per weight.
        overwrite: replace ``out_dir`` if it exists and is a checkpoint (or empty).
        force: with ``overwrite``, replace ``out_dir`` even if it is not a checkpoint.
        adapter_step: the step of the adapter checkpoint to use (the latest if None).
        group_bytes: the most bytes of base arrays read and written together (at least a weight).
        check_finite: refuse NaN/Inf in the adapters or new NaN/Inf in the merged weights.
        base_digest: where the adapters were saved with ``base=qparams`` (their
            :func:`jlora.checkpoint.save` records a digest of each dequantised weight), refuse a
            base whose dequantised weights differ: adapters trained over another quantisation
            (kind, block size, double quantisation) or another model.

    Returns:
        A :class:`jlora.checkpoint.MergeSummary`; with ``requantize``, ``(summary, {path:
        RequantizationError})`` equal to :func:`jlora.quant.merge`'s report.

    Raises:
        ValueError: ``out_dir`` is, contains or lies inside an input.
        FileExistsError: ``out_dir`` exists and may not be replaced.
        AdapterMismatchError: the checkpoint's arrays do not match its metadata or ``like``,
            ``like`` disagrees with the stored metadata, or the adapters do not fit the base.
        FileNotFoundError: no ``like`` and the base has no ``jlora_quant.json``.
        NonFiniteError: ``check_finite`` found NaN/Inf.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp, jlora, jlora.quant
        >>> work = tempfile.mkdtemp()
        >>> params = {"w": jax.random.normal(jax.random.key(0), (4, 64)), "b": jnp.zeros(64)}
        >>> config = jlora.LoraConfig(targets="w", rank=2)
        >>> q = jlora.quant.quantize(params, config)
        >>> _ = jlora.quant.save(f"{work}/base", q)
        >>> adapters = jlora.init(jax.random.key(1), params, config)
        >>> _ = jlora.checkpoint.save(f"{work}/adapter", adapters, config)
        >>> summary = jlora.quant.merge_checkpoint(f"{work}/base", f"{work}/adapter", f"{work}/out")
        >>> summary.merged, summary.copied
        (1, 1)
    """
    start = time.perf_counter()
    base = _dirs.absolute(_checks.path(base_dir, "base_dir"))
    adapter = _dirs.absolute(_checks.path(adapter_dir, "adapter_dir"))
    out = _dirs.absolute(_checks.path(out_dir, "out_dir"))
    group_bytes = _checks.count(group_bytes, "group_bytes", 1)
    for name, value in [("requantize", requantize), ("overwrite", overwrite), ("force", force)]:
        _checks.flag(value, name)
    _checks.flag(check_finite, "check_finite")
    _checks.not_a_file(os.fspath(out), "out", itself=False)
    _dirs.check_no_overlap(out, {"base": base, "adapter": adapter})
    recovered = _atomic.recover(out)
    if _dirs.lexists(out):
        if not overwrite:
            raise FileExistsError(
                f"out {out} already exists; pass overwrite=True to replace it once the new "
                "checkpoint is complete"
            )
        _dirs.check_replaceable(out, force)
    pytree_dir = dm._pytree_dir(base)
    disk = {leaf.path: leaf for leaf in dm._leaves(pytree_dir)}
    like = _like(pytree_dir, disk, like, base)
    units = _units(like, disk, base)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like, is_leaf=_is_q)
    # One NumPy read of the adapter arrays, with restore's checks and refusals (its wording).
    table, extras, record = restore_on_host(
        adapter, step=adapter_step, base=abstract, check_finite=check_finite
    )
    _checks.flag(base_digest, "base_digest")
    digests = record.base_digests if base_digest else None
    report: dict[str, RequantizationError] = {}
    written_meta: dict[str, dict[str, Any]] = {}
    merged = copied = peak = 0
    handler = ocp.PyTreeCheckpointHandler()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = _atomic.Scratch.create(out)
    target = scratch.path / "merged"
    try:
        for group in dm._groups(units, group_bytes):
            leaves = [disk[p] for u in group for p in u.arrays]
            peak = max(peak, sum(leaf.nbytes for leaf in leaves))
            read = dm._read_group(handler, pytree_dir, leaves)
            values: dict[str, Any] = {}
            for unit in group:
                factors = table.get(unit.path, extras.get(unit.path))
                if digests and unit.path in digests:
                    _check_digest(unit, read, digests[unit.path])
                written, err, meta = _merge_unit(
                    unit, read, factors, dtype, requantize, check_finite
                )
                values.update(written)
                written_meta.update(meta)
                if err is not None:
                    report[unit.path] = err
                merged += factors is not None
                copied += factors is None
            try:
                dm._write_group(target, values)
            except Exception as e:
                raise dm._write_failed(scratch.path, out, e) from e
            del read, values
        try:
            dm._finalize(target)
            _store.write_metadata(dm._only_pytree(target), written_meta)
        except Exception as e:
            raise dm._write_failed(scratch.path, out, e) from e
        _atomic.swap(dm._only_pytree(target), out, scratch)
    finally:
        handler.close()
        scratch.remove()
    summary = dm.MergeSummary(
        out=out,
        merged=merged,
        copied=copied,
        nbytes=sum(leaf.nbytes for leaf in disk.values()),
        seconds=time.perf_counter() - start,
        peak_group_bytes=peak,
        recovered=tuple(recovered),
    )
    return (summary, report) if requantize else summary


def _like(pytree_dir: Any, disk: dict[str, _Leaf], like: Any, base: Any) -> Any:
    """The base's quantised structure: from its ``jlora_quant.json`` (checked against ``like``)."""
    stored = _store.read_metadata(pytree_dir)
    if stored is None:
        if like is None:
            raise FileNotFoundError(
                f"base {base}: no {_store.METADATA}, so the quantisation of its arrays is not "
                "known (orbax alone wrote it); pass like=, the quantised tree it was saved from "
                "(or its jax.eval_shape), or save the base with jlora.quant.save"
            )
        return like
    if like is not None:
        _store.check_like(stored, like, base)
    _store.check_arrays(stored, disk, base)
    flat: dict[str, Any] = {}
    owners = {f"{path}/{field}": path for path in stored for field in _FIELDS}
    for path, leaf in disk.items():
        if path not in owners and leaf.is_array:
            flat[path] = jax.ShapeDtypeStruct(tuple(leaf.meta.shape), leaf.meta.dtype)
    for path, e in stored.items():
        flat[path] = _store.abstract_weight(e)
    return nest(flat)


def _check_digest(unit: _Unit, read: dict[str, Any], digest: str) -> None:
    """Refuses a weight whose (dequantised) value is not the one the adapters were saved for."""
    if not _is_q(unit.like):
        if _digest.array_digest(read[unit.path]) != digest:
            raise _base.content_mismatch(unit.path)
        return
    q = dataclasses.replace(
        unit.like, **{p.rsplit("/", 1)[1]: jnp.asarray(read[p]) for p in unit.arrays}
    )
    if _digest.array_digest(np.asarray(dequantize(q))) != digest:
        raise AdapterMismatchError(
            f"{unit.path}: the base's dequantised {q.kind} weight (block size {q.block_size}, "
            f"double_quant={q.double_quant}) differs from the one the adapters were saved for "
            "(its content digest): were they trained over another quantisation of this weight "
            "(kind, block size, double quantisation) or another model? Merge onto the base they "
            "were trained on, or pass base_digest=False to check shapes only"
        )


def _merge_unit(
    unit: _Unit, read: dict[str, Any], factors: Any, dtype: Any, requantize: bool, finite: bool
) -> tuple[dict[str, Any], RequantizationError | None, dict[str, Any]]:
    """``{disk path: value}`` to write for one weight, its re-quantisation error and metadata."""
    if _is_q(unit.like):
        value = dataclasses.replace(
            unit.like, **{p.rsplit("/", 1)[1]: jnp.asarray(read[p]) for p in unit.arrays}
        )
    elif factors is None:
        return {unit.path: read[unit.path]}, None, {}
    else:
        value = read[unit.path]
    adapters = nest({unit.path: factors}) if factors is not None else {}
    one = merge(nest({unit.path: value}), adapters, dtype=dtype, requantize=requantize)
    tree, report = one if requantize else (one, {})
    result = jax.tree.leaves(tree, is_leaf=_is_q)[0]
    if finite:
        base = dequantize(value, jnp.float32) if _is_q(value) else value
        check = dequantize(result, jnp.float32) if _is_q(result) else result
        dm._check_merged(unit.path, np.asarray(check), np.asarray(base))
    if _is_q(result):
        # None fields too: StandardCheckpointer records them; restoring into ``like`` needs them.
        written = {
            f"{unit.path}/{f}": None
            if getattr(result, f) is None
            else np.asarray(getattr(result, f))
            for f in _FIELDS
        }
        return written, report.get(unit.path), {unit.path: _store.entry(result)}
    return {unit.path: np.asarray(result)}, report.get(unit.path), {}
