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

Peak host memory is about twice a group (``group_bytes``, or the largest leaf if bigger: orbax
reads a group's leaves together and holds the merged group while it writes it) plus the work of
merging one leaf: its float32 delta and the merged leaf (twice a float32 leaf, three times a
bfloat16 one). The adapters are read once, onto the host (``_host_restore``). Merged
leaves get their delta from :func:`jlora.merge`'s own code, in one jitted pass per leaf
(``_leaf_merge``), so they equal the in-memory merge bit for bit. The resident size also depends
on the allocator: glibc keeps freed buffers of up to 32 MiB in its heap once its adaptive mmap
threshold has risen, so a long merge can hold several hundred MiB it no longer uses. Run with
``MALLOC_MMAP_THRESHOLD_=1048576`` (the ``jlora merge`` command line sets this itself) to return
them at once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from .. import _atomic, _checks, _digest, _dirs
from .._merge import merge
from .._paths import nest
from . import _base
from ._steps import PathLike
from ._host_restore import restore_on_host
from ._leaf_io import _finalize as _finalize
from ._leaf_io import _groups as _groups
from ._leaf_io import _leaves as _leaves
from ._leaf_io import _only_pytree as _only_pytree
from ._leaf_io import _pytree_dir as _pytree_dir
from ._leaf_io import _read_group as _read_group
from ._leaf_io import _write_failed as _write_failed
from ._leaf_io import _write_group as _write_group
from ._leaf_merge import check_merged as _check_merged
from ._leaf_merge import merge_leaf, supported

DEFAULT_GROUP_BYTES = 2**27


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
        recovered: what was repaired before merging (see :func:`recover_merge`).
    """

    out: epath.Path
    merged: int
    copied: int
    nbytes: int
    seconds: float
    peak_group_bytes: int
    recovered: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "".join(f"{line}\n" for line in self.recovered) + (
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
    force: bool = False,
    adapter_step: int | None = None,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    progress: bool = False,
    check_finite: bool = True,
    base_digest: bool = True,
) -> MergeSummary:
    """Folds an adapter checkpoint into a base checkpoint on disk and writes a new base checkpoint.

    The base is read and the result written a group of leaves at a time (at most ``group_bytes``
    of base leaves, or one leaf if it is larger), so host memory stays near a few groups, not the
    model. Each adapted leaf is computed as :func:`jlora.merge` computes it, so the output
    equals the in-memory ``jlora.merge(base, adapters)`` bit for bit (a trainable extra's leaf is
    the extra's saved value); other leaves are copied.

    The new checkpoint is assembled in a scratch directory next to ``out_dir`` and renamed into
    place only when complete: a failure leaves ``out_dir`` (and the inputs) as they were, and a
    kill at any moment is repaired by the next merge into ``out_dir`` (or by
    :func:`recover_merge`), which also deletes the scratch directories of killed merges. Paths are
    compared after following symlinks (and by device and inode), so no alias of an input can be
    the output. ``overwrite`` replaces only an orbax PyTree checkpoint or an empty directory
    (``force`` lifts that).

    Args:
        base_dir: the base model's orbax PyTree checkpoint (see the module docstring).
        adapter_dir: an adapter checkpoint from :func:`jlora.checkpoint.save` (or a root of steps;
            the latest step is used unless ``adapter_step`` is given).
        out_dir: where to write the merged checkpoint; neither input nor inside one (relative
            paths are taken from the working directory).
        overwrite: replace ``out_dir`` if it exists (only after the new checkpoint is complete).
        force: with ``overwrite``, replace ``out_dir`` even if it is not a checkpoint jlora could
            have written (a file, or a directory of other files).
        adapter_step: the step of the adapter checkpoint to use.
        group_bytes: the most bytes of base leaves read and written together.
        progress: show a tqdm progress bar (if tqdm is installed).
        check_finite: refuse adapters holding NaN/Inf and merged leaves that hold NaN/Inf where
            the base leaf is finite (a bfloat16 overflow, say), before anything reaches
            ``out_dir`` (PEFT's ``safe_merge``; cheap next to reading and writing the leaf).
        base_digest: compare each base leaf with the content digest saved with the adapters
            (when :func:`jlora.checkpoint.save` was given the base), as it is read; False checks
            shapes only.

    Returns:
        A :class:`MergeSummary`.

    Raises:
        ValueError: ``out_dir`` is, contains or lies inside an input (symlinks followed), or
            ``base_dir`` is not a PyTree checkpoint.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it is not a checkpoint
            jlora could have written and ``force`` is False.
        AdapterMismatchError: the adapters were saved for another base (fingerprint or content
            digest) or do not fit it.
        NonFiniteError: ``check_finite`` found NaN/Inf in the adapters or the merged weights.
        DamagedCheckpointError: a checkpoint's files are missing, truncated or corrupt.

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
    base = _dirs.absolute(_checks.path(base_dir, "base_dir"))
    adapter = _dirs.absolute(_checks.path(adapter_dir, "adapter_dir"))
    out = _dirs.absolute(_checks.path(out_dir, "out_dir"))
    group_bytes = _checks.count(group_bytes, "group_bytes", 1)
    for name, value in [("overwrite", overwrite), ("force", force), ("progress", progress)]:
        _checks.flag(value, name)
    _checks.flag(check_finite, "check_finite")
    _checks.flag(base_digest, "base_digest")
    _checks.not_a_file(os.fspath(out), "out", itself=False)
    _dirs.check_no_overlap(out, {"base": base, "adapter": adapter})
    recovered = _atomic.recover(out)
    if _dirs.lexists(out):
        if not overwrite:
            raise FileExistsError(
                f"out {out} already exists; pass overwrite=True (--overwrite on the command line) "
                "to replace it once the new checkpoint is complete"
            )
        _dirs.check_replaceable(out, force)
    pytree_dir = _pytree_dir(base)
    leaves = _leaves(pytree_dir)
    abstract_base = nest({leaf.path: leaf.meta for leaf in leaves if leaf.is_array})
    table, extras, record = restore_on_host(
        adapter, step=adapter_step, base=abstract_base, check_finite=check_finite
    )
    saved_digests = record.base_digests if base_digest else None

    merged = copied = peak = 0
    update, close = _progress_bar(sum(leaf.nbytes for leaf in leaves), progress)
    handler = ocp.PyTreeCheckpointHandler()
    # Assembled next to `out` (same file system, so the final rename is atomic) and removed on
    # any failure; `out` itself is touched only once the new checkpoint is complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = _atomic.Scratch.create(out)
    target = scratch.path / "merged"
    try:
        for group in _groups(leaves, group_bytes):
            peak = max(peak, sum(leaf.nbytes for leaf in group))
            values = _read_group(handler, pytree_dir, group)
            for leaf in group:
                value = values[leaf.path]
                if saved_digests and leaf.path in saved_digests:
                    if _digest.array_digest(value) != saved_digests[leaf.path]:
                        raise _base.content_mismatch(leaf.path)
                factors = table.get(leaf.path, extras.get(leaf.path))
                if factors is None:
                    copied += 1
                elif supported(value, factors):
                    values[leaf.path] = merge_leaf(
                        leaf.path, value, factors, check_finite=check_finite
                    )
                    merged += 1
                else:  # a trainable extra, or a dtype merge_leaf leaves to jlora.merge
                    one = merge(nest({leaf.path: value}), nest({leaf.path: factors}))
                    values[leaf.path] = np.asarray(jax.tree_util.tree_leaves(one)[0])
                    if check_finite:
                        _check_merged(leaf.path, values[leaf.path], value)
                    merged += 1
                update(leaf.nbytes)
            try:
                _write_group(target, values)
            except Exception as e:
                raise _write_failed(scratch.path, out, e) from e
            del values
        try:
            _finalize(target)
        except Exception as e:
            raise _write_failed(scratch.path, out, e) from e
        # The finalized v1 checkpoint holds the PyTree in one subdirectory, a complete PyTree
        # checkpoint of its own: that is the output, so the loaders users already call
        # (ocp.StandardCheckpointer().restore(out), ocp.v1.load_pytree(out)) read it directly.
        _atomic.swap(_only_pytree(target), out, scratch)
    finally:
        handler.close()
        close()
        scratch.remove()
    return MergeSummary(
        out=out,
        merged=merged,
        copied=copied,
        nbytes=sum(leaf.nbytes for leaf in leaves),
        seconds=time.perf_counter() - start,
        peak_group_bytes=peak,
        recovered=tuple(recovered),
    )


def recover_merge(out_dir: PathLike) -> list[str]:
    """Repairs ``out_dir`` after a killed :func:`merge_checkpoint` and deletes its leftovers.

    A merge killed between the two renames that replace an existing output leaves ``out_dir``
    missing, with the old and the new checkpoint in a scratch directory
    ``.<out>.jlora-merge-<pid>-<tag>`` beside it. This puts the new (complete) checkpoint in place,
    or the old one back when the new one was not complete, and deletes the scratch directories of
    merges into ``out_dir`` whose process is no longer running. ``merge_checkpoint`` does this
    itself before each merge; call this (or ``jlora recover --out DIR``) to repair without merging.

    Args:
        out_dir: the output directory of the killed merge.

    Returns:
        What was done, one line per action (empty when there was nothing to repair).

    Example:
        >>> import tempfile
        >>> recover_merge(tempfile.mkdtemp() + "/out")
        []
    """
    return _atomic.recover(_dirs.absolute(_checks.path(out_dir, "out_dir")))
