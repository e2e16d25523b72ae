"""`save` and `restore`: a quantised params tree on disk, with its quantisation metadata.

orbax stores only the arrays of a :class:`QuantizedWeight` (``codes``, ``scales``, ...); its kind,
dtype, block size and axes are static pytree metadata, and NF4 and int4 codes look the same on
disk. So :func:`save` writes, inside the orbax PyTree checkpoint, the file ``jlora_quant.json``:

    {"format": "jlora.quant", "version": 1,
     "weights": {"<path>": {"kind": "nf4", "shape": [..], "dtype": "bfloat16", "block_size": 64,
                            "double_quant": true, "stack_ndim": 0, "axes": []}, ...}}

(one entry per quantised weight, ``/``-joined dict paths; float leaves are plain orbax arrays).
:func:`restore` and :func:`jlora.quant.merge_checkpoint` read it, so neither needs ``like=``; a
``like`` given anyway is checked against it. The arrays on disk are checked against what the
metadata implies (shape and dtype of every array), so a metadata file that does not belong to its
arrays is refused with the path. The checkpoint is written into a scratch directory beside the
output and renamed into place when complete, as :func:`jlora.checkpoint.save` does.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _atomic, _checks, _dirs
from .._errors import AdapterMismatchError
from .._paths import nest, path_to_str
from ..checkpoint._steps import PathLike
from . import _codes
from ._weight import QuantizedWeight

METADATA = "jlora_quant.json"
FORMAT, VERSION = "jlora.quant", 1
FIELDS = ("codes", "scales", "scale_scales", "scale_offset")
_KEYS = ("kind", "shape", "dtype", "block_size", "double_quant", "stack_ndim", "axes")


def _is_q(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def entry(q: QuantizedWeight) -> dict[str, Any]:
    """The metadata of one quantised weight, as stored in ``jlora_quant.json``."""
    return {
        "kind": q.kind,
        "shape": list(q.shape),
        "dtype": q.dtype,
        "block_size": q.block_size,
        "double_quant": q.double_quant,
        "stack_ndim": q.stack_ndim,
        "axes": list(q.axes),
    }


def describe(tree: Any) -> dict[str, dict[str, Any]]:
    """``{path: entry}`` of every quantised weight in ``tree`` (arrays or ``jax.eval_shape``)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_q)[0]
    return {path_to_str(p): entry(x) for p, x in flat if _is_q(x)}


def array_specs(e: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays a weight with metadata ``e`` is stored as: ``{field: shape and dtype}``."""
    shape = tuple(e["shape"])
    if e["kind"] == "int8":
        reduced = {a % len(shape) for a in e["axes"]}
        scales = tuple(1 if k in reduced else s for k, s in enumerate(shape))
        return {
            "codes": jax.ShapeDtypeStruct(shape, jnp.int8),
            "scales": jax.ShapeDtypeStruct(scales, jnp.float32),
        }
    lead, n, block = shape[:-1], shape[-1], e["block_size"]
    specs = {"codes": jax.ShapeDtypeStruct((*lead, n // 2), jnp.uint8)}
    scales = (*lead, n // block)
    if not e["double_quant"]:
        specs["scales"] = jax.ShapeDtypeStruct(scales, jnp.float32)
        return specs
    stack = scales[: e["stack_ndim"]]
    per_slice = math.prod(scales[e["stack_ndim"] :])
    specs["scales"] = jax.ShapeDtypeStruct(scales, jnp.int8)
    blocks = -(-per_slice // _codes.DQ_BLOCK)
    specs["scale_scales"] = jax.ShapeDtypeStruct((*stack, blocks), jnp.float32)
    specs["scale_offset"] = jax.ShapeDtypeStruct(stack, jnp.float32)
    return specs


def abstract_weight(e: dict[str, Any]) -> QuantizedWeight:
    """A :class:`QuantizedWeight` of ``jax.ShapeDtypeStruct`` leaves with metadata ``e``."""
    specs = array_specs(e)
    return QuantizedWeight(
        specs["codes"],
        specs["scales"],
        specs.get("scale_scales"),
        specs.get("scale_offset"),
        e["kind"],
        e["dtype"],
        e["block_size"],
        tuple(e["axes"]),
    )


def read_metadata(pytree_dir: Any) -> dict[str, dict[str, Any]] | None:
    """The ``weights`` table of ``pytree_dir``'s ``jlora_quant.json``, or None if it has none."""
    path = pytree_dir / METADATA
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        ok = data.get("format") == FORMAT and isinstance(data.get("weights"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: not a jlora.quant metadata file (format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(
            f"{path}: jlora.quant metadata version {data.get('version')!r}; this jlora reads "
            f"version {VERSION}. Save it again with this jlora version"
        )
    return data["weights"]


def write_metadata(pytree_dir: Any, weights: dict[str, dict[str, Any]]) -> None:
    """Writes ``jlora_quant.json`` into ``pytree_dir`` atomically."""
    text = json.dumps({"format": FORMAT, "version": VERSION, "weights": weights}, indent=1)
    _atomic._write_atomically(pytree_dir / METADATA, text)


def check_like(stored: dict[str, dict[str, Any]], like: Any, where: Any) -> None:
    """Refuses a ``like`` whose quantised weights differ from the stored metadata (by path)."""
    given = describe(like)
    for path in sorted(set(stored) | set(given)):
        if path not in given or path not in stored:
            has, lacks = ("the checkpoint", "like")
            if path not in stored:
                has, lacks = lacks, has
            raise AdapterMismatchError(
                f"{path}: {has} holds a quantised weight here but {lacks} does not "
                f"(checkpoint {where}); pass the quantised tree this checkpoint was saved from, "
                "or leave like out to use the stored metadata"
            )
        for key in _KEYS:
            if stored[path][key] != given[path][key]:
                raise AdapterMismatchError(
                    f"{path}: the checkpoint {where} stores {key}={stored[path][key]!r} but like "
                    f"has {key}={given[path][key]!r}; pass the quantised tree this checkpoint was "
                    "saved from, or leave like out to use the stored metadata"
                )


def check_arrays(stored: dict[str, dict[str, Any]], disk: dict[str, Any], where: Any) -> None:
    """Refuses arrays on disk whose shape or dtype the stored metadata does not imply."""
    for path, e in stored.items():
        for field, spec in array_specs(e).items():
            leaf = disk.get(f"{path}/{field}")
            want = (tuple(spec.shape), np.dtype(spec.dtype).name)
            got = None if leaf is None else (tuple(leaf.meta.shape), np.dtype(leaf.meta.dtype).name)
            if got != want:
                found = "is missing" if got is None else f"has shape {got[0]} and dtype {got[1]}"
                raise AdapterMismatchError(
                    f"{path}/{field}: the checkpoint {where} {found} but its metadata "
                    f"({METADATA}: {e['kind']}, shape {tuple(e['shape'])}, block size "
                    f"{e['block_size']}, double_quant={e['double_quant']}) gives shape {want[0]} "
                    f"and dtype {want[1]}; the metadata file does not belong to these arrays. "
                    "Save the quantised tree again with jlora.quant.save"
                )


def save(directory: PathLike, qparams: Any) -> Any:
    """Saves a quantised params tree (an orbax PyTree checkpoint plus its metadata), atomically.

    The arrays are written by orbax; each :class:`QuantizedWeight`'s kind, shape, dtype, block
    size, double quantisation, stack axes and int8 axes go to ``jlora_quant.json`` in the same
    directory, so :func:`jlora.quant.restore` and :func:`jlora.quant.merge_checkpoint` need no
    ``like``. Everything is written into a scratch directory beside ``directory`` and renamed into
    place when complete; an existing ``directory`` is never replaced.

    Args:
        directory: where to write; must not exist.
        qparams: a params tree of nested dicts holding :class:`QuantizedWeight` (and float) leaves.

    Returns:
        The checkpoint's path.

    Raises:
        FileExistsError: ``directory`` exists.
        ValueError: ``qparams`` holds containers other than dicts.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora.quant
        >>> q = jlora.quant.quantize({"w": jnp.ones((4, 64)), "b": jnp.zeros(64)}, "w")
        >>> path = jlora.quant.save(f"{tempfile.mkdtemp()}/q", q)
        >>> back = jlora.quant.restore(path)  # no like: the metadata is on disk
        >>> back["w"].kind, bool((back["w"].codes == q["w"].codes).all())
        ('nf4', True)
    """
    import orbax.checkpoint as ocp

    out = _dirs.absolute(_checks.path(directory, "directory"))
    for key_path, _ in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_q)[0]:
        if not all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
            raise ValueError(
                f"qparams: {path_to_str(key_path)} sits under a list or tuple node; "
                "jlora.quant.save takes parameter trees of nested dicts (what Flax makes)"
            )
    if _dirs.lexists(out):
        raise FileExistsError(f"directory {out} already exists; jlora.quant.save never replaces")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = _atomic.Scratch.create(out, "save")
    new = scratch.path / "quantized"
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.fspath(new), qparams)
        write_metadata(new, describe(qparams))
        _atomic.place(new, out, scratch)
    finally:
        scratch.remove()
    return out


def restore(directory: PathLike, *, like: Any = None) -> Any:
    """Restores a quantised params tree saved by :func:`jlora.quant.save`, bit for bit.

    Args:
        directory: the checkpoint (or a merged one from :func:`jlora.quant.merge_checkpoint` with
            ``requantize=True``).
        like: optional: the quantised tree it was saved from (or its ``jax.eval_shape``), checked
            against the stored metadata.

    Returns:
        The params tree (nested dicts), quantised weights as :class:`QuantizedWeight` of
        ``jax.Array`` leaves, float leaves as ``jax.Array``.

    Raises:
        FileNotFoundError: no checkpoint, or one without ``jlora_quant.json`` (saved by orbax
            alone: restore it with orbax and a target).
        AdapterMismatchError: ``like`` disagrees with the stored metadata, or the arrays on disk
            with what the metadata implies (the error names the path).

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora.quant
        >>> q = jlora.quant.quantize({"w": jnp.ones((4, 64))}, "w", kind="int8")
        >>> path = jlora.quant.save(f"{tempfile.mkdtemp()}/q", q)
        >>> jlora.quant.restore(path, like=q)["w"].axes  # like: an optional cross-check
        (-2,)
    """
    import orbax.checkpoint as ocp

    from ..checkpoint import _disk_merge as dm

    base = _dirs.absolute(_checks.path(directory, "directory"))
    pytree_dir = dm._pytree_dir(base)
    stored = read_metadata(pytree_dir)
    if stored is None:
        raise FileNotFoundError(
            f"{pytree_dir}: no {METADATA}; this checkpoint was not written by jlora.quant.save. "
            "Restore it with orbax and the quantised tree as the target"
        )
    if like is not None:
        check_like(stored, like, base)
    leaves = dm._leaves(pytree_dir)
    disk = {leaf.path: leaf for leaf in leaves}
    check_arrays(stored, disk, base)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        read = dm._read_group(handler, pytree_dir, [leaf for leaf in leaves if leaf.is_array])
    finally:
        handler.close()
    flat: dict[str, Any] = {}
    for path, value in read.items():
        owner, _, field = path.rpartition("/")
        if owner not in stored:
            flat[path] = jnp.asarray(value)
    for path, e in stored.items():
        arrays = {f: jnp.asarray(read[f"{path}/{f}"]) for f in array_specs(e)}
        flat[path] = QuantizedWeight(
            arrays["codes"],
            arrays["scales"],
            arrays.get("scale_scales"),
            arrays.get("scale_offset"),
            e["kind"],
            e["dtype"],
            e["block_size"],
            tuple(e["axes"]),
        )
    return nest(flat)
