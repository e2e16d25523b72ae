"""Merging an adapter checkpoint into a base checkpoint on disk, a bounded group of leaves at a time.

**Base checkpoint format.** A base checkpoint is an orbax PyTree checkpoint of the parameters, the
format Flax and most JAX training code already write: ``ocp.StandardCheckpointer().save(dir,
params)`` (arrays directly in ``dir``), a ``CheckpointManager`` item (``step/<item>/``) or
``ocp.v1.save(dir, params)`` (``dir/<checkpointable>/``). orbax restores any subset of leaves
(``partial_restore``), so the base is read a group of leaves at a time and never as a whole.

**Writing.** A PyTree checkpoint is normally written in one call that holds every array. orbax's
partial saving (``orbax.checkpoint.experimental.v1.partial``) appends leaves to an unfinished
checkpoint and commits it once, so the merged model is written group by group too. Its output is
a PyTree checkpoint like the one ``ocp.StandardCheckpointer().save`` writes:
``ocp.StandardCheckpointer().restore(out)`` and ``ocp.v1.load_pytree(out)`` read it, and it can be
the base of a further merge.

Peak host memory is about one group (``group_bytes``, or the largest leaf if bigger) plus the
float32 work of merging one leaf. Merged leaves are computed by :func:`jlora.merge` itself, one
leaf at a time, so they equal the in-memory merge bit for bit. The resident size also depends on
the allocator: glibc keeps freed buffers of up to 32 MiB in its heap once its adaptive mmap
threshold has risen, so a long merge can hold several hundred MiB it no longer uses. Run with
``MALLOC_MMAP_THRESHOLD_=1048576`` (the ``jlora merge`` command line sets this itself) to return
them at once.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ._ckpt_adapters import RECORD, PathLike, restore
from ._merge import adapter_tables, merge
from ._paths import key_to_str, nest

DEFAULT_GROUP_BYTES = 2**27
_METADATA = "_METADATA"


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    """What :func:`merge_checkpoint` did.

    Attributes:
        out: the new base checkpoint.
        merged: number of leaves that had an adapter folded in (or were replaced by an extra).
        copied: number of leaves copied unchanged.
        nbytes: bytes of array data written.
        seconds: wall-clock time.
        peak_group_bytes: the most bytes of base leaves held in memory at once.
    """

    out: epath.Path
    merged: int
    copied: int
    nbytes: int
    seconds: float
    peak_group_bytes: int

    def __str__(self) -> str:
        return (
            f"merged {self.merged} adapted leaves and copied {self.copied} others "
            f"({_human(self.nbytes)}, at most {_human(self.peak_group_bytes)} of base leaves in "
            f"memory at once) in {self.seconds:.1f} s into {self.out}; load it with "
            f"orbax.checkpoint.StandardCheckpointer().restore('{self.out}')"
        )


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


@dataclasses.dataclass(frozen=True)
class _Leaf:
    keys: tuple[str, ...]
    path: str
    meta: Any
    nbytes: int

    @property
    def is_array(self) -> bool:
        return isinstance(self.meta, ocp.metadata.ArrayMetadata) and not isinstance(
            self.meta, ocp.metadata.ScalarMetadata
        )


def _resolved(path: PathLike) -> epath.Path:
    p = epath.Path(path)
    try:
        return p.resolve()
    except (NotImplementedError, OSError):  # remote file systems
        return p


def _check_paths(base: epath.Path, adapter: epath.Path, out: epath.Path, overwrite: bool) -> None:
    for name, p in (("base", base), ("adapter", adapter)):
        if out == p or p in out.parents or out in p.parents:
            raise ValueError(
                f"out {out} would overwrite the {name} checkpoint {p} (the same directory, or one "
                "inside the other); merge_checkpoint never writes over its inputs. Choose another "
                "output directory"
            )
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"out {out} already exists; pass overwrite=True (--overwrite on the command line) to "
            "replace it once the new checkpoint is complete"
        )


def _pytree_dir(base: epath.Path) -> epath.Path:
    if not base.is_dir():
        raise FileNotFoundError(f"base {base}: no such directory; expected an orbax checkpoint")
    if (base / RECORD).is_dir():
        raise ValueError(
            f"base {base} is a jlora adapter checkpoint; expected the base model's orbax PyTree "
            "checkpoint (pass the adapters as the adapter checkpoint)"
        )
    if (base / _METADATA).exists():
        return base
    found = sorted(c for c in base.iterdir() if c.is_dir() and (c / _METADATA).exists())
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"base {base}: expected an orbax PyTree checkpoint (a directory holding {_METADATA}, or a "
        f"checkpoint with exactly one PyTree item) but found PyTree items "
        f"{[c.name for c in found]}; pass the item's directory, e.g. {base}/<item>"
    )


def _leaves(pytree_dir: epath.Path) -> list[_Leaf]:
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(pytree_dir)
    finally:
        handler.close()
    tree = getattr(metadata, "tree", metadata)
    out = []
    for key_path, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
            raise ValueError(
                f"base {pytree_dir}: {'/'.join(map(key_to_str, key_path))} sits under a list or "
                "tuple node; merge_checkpoint supports parameter trees of nested dicts (what Flax "
                "saves)"
            )
        keys = tuple(str(k.key) for k in key_path)
        leaf = _Leaf(keys, "/".join(keys), meta, 0)
        if leaf.is_array:
            nbytes = math.prod(meta.shape) * np.dtype(meta.dtype).itemsize
            leaf = dataclasses.replace(leaf, nbytes=nbytes)
        out.append(leaf)
    return out


def _groups(leaves: list[_Leaf], group_bytes: int) -> Iterator[list[_Leaf]]:
    group: list[_Leaf] = []
    size = 0
    for leaf in leaves:
        if group and size + leaf.nbytes > group_bytes:
            yield group
            group, size = [], 0
        group.append(leaf)
        size += leaf.nbytes
    if group:
        yield group


def _read_group(
    handler: ocp.PyTreeCheckpointHandler, pytree_dir: epath.Path, group: list[_Leaf]
) -> dict[str, Any]:
    """The values of ``group``'s leaves, ``{path: numpy array or scalar}``, read from disk."""
    item, args = {}, {}
    for leaf in group:
        if leaf.is_array:
            # A zero-strided view: the shape and dtype of the leaf without allocating it.
            item[leaf.path] = np.broadcast_to(np.zeros((), leaf.meta.dtype), leaf.meta.shape)
            args[leaf.path] = ocp.RestoreArgs(restore_type=np.ndarray)
        else:
            item[leaf.path], args[leaf.path] = 0, ocp.RestoreArgs()
    restored = handler.restore(
        pytree_dir,
        args=ocp.args.PyTreeRestore(item=nest(item), restore_args=nest(args), partial_restore=True),
    )
    values = {}
    for leaf in group:
        node = restored
        for key in leaf.keys:
            node = node[key]
        values[leaf.path] = node
    return values


def _partial_api() -> Any:
    try:
        from orbax.checkpoint.experimental.v1 import partial
    except ImportError as e:  # pragma: no cover - depends on the installed orbax
        raise ImportError(
            "merge_checkpoint writes with orbax's partial saving "
            "(orbax.checkpoint.experimental.v1.partial), which this orbax-checkpoint lacks; "
            "upgrade orbax-checkpoint"
        ) from e
    return partial


def _write_group(target: epath.Path, values: dict[str, Any]) -> None:
    _partial_api().save(target, nest(values))


def _progress_bar(total: int, enabled: bool) -> tuple[Callable[[int], Any], Callable[[], Any]]:
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the bar is optional
            pass
        else:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge")
            return bar.update, bar.close
    return (lambda n: None), (lambda: None)


def merge_checkpoint(
    base_dir: PathLike,
    adapter_dir: PathLike,
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    adapter_step: int | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: bool = False,
) -> MergeSummary:
    """Folds an adapter checkpoint into a base checkpoint on disk and writes a new base checkpoint.

    The base is read and the result written a group of leaves at a time (at most ``group_bytes``
    of base leaves, or one leaf if it is larger), so host memory stays near the largest leaf, not
    the model. Each adapted leaf is computed by :func:`jlora.merge`, so the output equals the
    in-memory ``jlora.merge(base, adapters)`` bit for bit (a trainable extra's leaf is the extra's
    saved value); other leaves are copied. The new
    checkpoint is assembled in a scratch directory next to ``out_dir`` and renamed into place only
    when complete: a failure leaves ``out_dir`` (and the inputs) as they were.

    Args:
        base_dir: the base model's orbax PyTree checkpoint (see the module docstring).
        adapter_dir: an adapter checkpoint from :func:`jlora.checkpoint.save` (or a root of steps;
            the latest step is used unless ``adapter_step`` is given).
        out_dir: where to write the merged checkpoint; neither input nor inside one.
        overwrite: replace ``out_dir`` if it exists (only after the new checkpoint is complete).
        adapter_step: the step of the adapter checkpoint to use.
        group_bytes: the most bytes of base leaves read and written together.
        progress: show a tqdm progress bar (if tqdm is installed).

    Returns:
        A :class:`MergeSummary`.

    Raises:
        ValueError: ``out_dir`` is or overlaps an input, or ``base_dir`` is not a PyTree
            checkpoint.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        AdapterMismatchError: the adapters were saved for another base (fingerprint) or do not
            fit it.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp, jlora
        >>> from jlora import checkpoint
        >>> work = tempfile.mkdtemp()
        >>> params = {"w": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(f"{work}/base", params)
        >>> config = jlora.LoraConfig(targets="w", rank=2)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> _ = checkpoint.save(f"{work}/adapter", adapters, config, base=params)
        >>> summary = checkpoint.merge_checkpoint(f"{work}/base", f"{work}/adapter", f"{work}/out")
        >>> summary.merged, summary.copied, summary.nbytes
        (1, 1, 60)
    """
    start = time.perf_counter()
    base, adapter, out = _resolved(base_dir), _resolved(adapter_dir), _resolved(out_dir)
    if isinstance(group_bytes, bool) or not isinstance(group_bytes, int) or group_bytes < 1:
        raise ValueError(f"group_bytes: {group_bytes!r} is invalid; expected an integer >= 1")
    _check_paths(base, adapter, out, overwrite)
    pytree_dir = _pytree_dir(base)
    leaves = _leaves(pytree_dir)
    abstract_base = nest({leaf.path: leaf.meta for leaf in leaves if leaf.is_array})
    adapters, _ = restore(adapter, step=adapter_step, base=abstract_base)
    table, extras = adapter_tables(adapters)

    merged = copied = peak = 0
    update, close = _progress_bar(sum(leaf.nbytes for leaf in leaves), progress)
    handler = ocp.PyTreeCheckpointHandler()
    # Assembled next to `out` (same file system, so the final rename is atomic) and removed on
    # any failure; `out` itself is touched only once the new checkpoint is complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.jlora-merge-{uuid.uuid4().hex[:12]}"
    target = scratch / "merged"
    try:
        scratch.mkdir()
        for group in _groups(leaves, group_bytes):
            peak = max(peak, sum(leaf.nbytes for leaf in group))
            values = _read_group(handler, pytree_dir, group)
            for leaf in group:
                factors = table.get(leaf.path, extras.get(leaf.path))
                if factors is None:
                    copied += 1
                else:
                    one = merge(nest({leaf.path: values[leaf.path]}), nest({leaf.path: factors}))
                    values[leaf.path] = np.asarray(jax.tree_util.tree_leaves(one)[0])
                    merged += 1
                update(leaf.nbytes)
            _write_group(target, values)
            del values
        _partial_api().finalize(target)
        # The finalized v1 checkpoint holds the PyTree in one subdirectory, a complete PyTree
        # checkpoint of its own: that is the output, so the loaders users already call
        # (ocp.StandardCheckpointer().restore(out), ocp.v1.load_pytree(out)) read it directly.
        _replace(_only_pytree(target), out, scratch)
    finally:
        handler.close()
        close()
        scratch.rmtree(missing_ok=True)
    return MergeSummary(
        out=out,
        merged=merged,
        copied=copied,
        nbytes=sum(leaf.nbytes for leaf in leaves),
        seconds=time.perf_counter() - start,
        peak_group_bytes=peak,
    )


def _only_pytree(target: epath.Path) -> epath.Path:
    found = [d for d in target.iterdir() if d.is_dir() and (d / "_METADATA").exists()]
    if len(found) != 1:
        raise RuntimeError(
            f"{target}: orbax's partial save wrote {sorted(d.name for d in found)} PyTree "
            "directories, expected one; this orbax-checkpoint version lays checkpoints out "
            "differently from those jlora was tested with"
        )
    return found[0]


def _replace(new: epath.Path, out: epath.Path, scratch: epath.Path) -> None:
    """Moves the complete checkpoint ``new`` to ``out``, setting an existing ``out`` aside first."""
    if not out.exists():
        new.rename(out)
        return
    previous = scratch / "previous"
    out.rename(previous)
    try:
        new.rename(out)
    except BaseException:
        previous.rename(out)
        raise
