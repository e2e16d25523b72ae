"""Saving adapters with their config as one orbax checkpoint (restoring it: ``_restore``).

A checkpoint is an orbax composite checkpoint with two items: ``adapters`` (the factor arrays, and
the arrays of trainable extras, as a nested dict mirroring the parameter paths) and ``jlora`` (JSON:
the config, each adapter's layout and shapes, each extra's shape and dtype, a SHA-256 digest of
every array, and optionally a fingerprint of the base; see ``_format``). It is the layout orbax's
``CheckpointManager`` writes for ``save_args(...)``, so periodic checkpoints under a root
directory (``root/<step>/``) and single checkpoints read back the same way.

On local disks orbax writes into a scratch directory of jlora's, ``.<name>.jlora-save-<pid>-<tag>``
beside the target, which jlora renames into place once everything is on disk (``_atomic``): an
interrupted save leaves no directory under the final name, a failed one removes its scratch
directory once orbax's writers have stopped, and each save removes those of killed saves. ``save``
refuses an existing target rather than deleting it first (orbax's ``force=True`` removes the old
checkpoint before writing). On remote file systems orbax commits the checkpoint its own way.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from .. import _atomic, _checks, _dirs
from .._config import LoraConfig
from .._extras import Trainable
from .._factors import LoraFactors
from .._paths import nest
from . import _format as fmt
from . import _magnitudes, _orbax_writes
from ._steps import ARRAYS, RECORD, PathLike, _check_step, first_line

def _arrays_tree(
    table: dict[str, LoraFactors], extras: dict[str, Trainable], magnitudes: dict[str, Any]
) -> dict[str, Any]:
    # An extra's array sits at its own path: a weight's path is never a prefix of another's.
    arrays = {path: {"a": f.a, "b": f.b} for path, f in table.items()}
    for path, m in magnitudes.items():
        arrays[path]["m"] = m  # DoRA's magnitude beside its factors (format version 3)
    return nest({**arrays, **{path: e.value for path, e in extras.items()}})


def save_args(
    adapters: Any,
    config: LoraConfig,
    *,
    base: Any | None = None,
    base_digest: bool = True,
    magnitudes: Any | None = None,
) -> ocp.args.Composite:
    """The orbax save arguments of an adapter checkpoint, for ``CheckpointManager.save``.

    With a ``CheckpointManager`` each step is written to ``root/<step>/`` in the same layout as
    :func:`save`, so :func:`restore` (which picks the latest step by default) reads it back.

    Args:
        adapters: the adapter pytree (``LoraFactors`` of concrete arrays).
        config: the config the adapters were made with.
        base: optional base parameters (arrays or ``jax.ShapeDtypeStruct``) whose paths, shapes
            and dtypes are recorded, so that :func:`restore` can refuse another base.
        base_digest: also record a content digest of each base weight (when ``base`` holds
            values this process can read whole); costs one pass over the base (``_base``).
        magnitudes: DoRA's magnitudes ``{path: m}`` for these adapters, saved beside them (as
            :func:`save`).

    Returns:
        ``ocp.args.Composite(adapters=StandardSave(...), jlora=JsonSave(...))``.

    Raises:
        AdapterMismatchError: the adapters do not match ``config`` (scale, targeted paths) or
            ``base`` (missing path, shapes).
        TypeError: ``config`` is not a :class:`jlora.LoraConfig`.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp, jlora
        >>> from jlora import checkpoint
        >>> params = {"w": jnp.ones((4, 3))}
        >>> config = jlora.LoraConfig(targets="w", rank=2)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> root = tempfile.mkdtemp()
        >>> options = ocp.CheckpointManagerOptions(max_to_keep=2)
        >>> with ocp.CheckpointManager(root, options=options) as manager:
        ...     for step in range(4):
        ...         _ = manager.save(step, args=checkpoint.save_args(adapters, config))
        >>> checkpoint.steps(root)
        [2, 3]
    """
    table, extras = fmt.check_adapters(adapters, config, base)
    ms = _magnitudes.check(magnitudes, table)
    return ocp.args.Composite(
        **{
            ARRAYS: ocp.args.StandardSave(_arrays_tree(table, extras, ms)),
            RECORD: ocp.args.JsonSave(fmt.record(table, config, base, extras, base_digest, ms)),
        }
    )


def save(
    directory: PathLike,
    adapters: Any,
    config: LoraConfig,
    *,
    step: int | None = None,
    base: Any | None = None,
    base_digest: bool = True,
    magnitudes: Any | None = None,
) -> epath.Path:
    """Saves adapters, their config and (optionally) a base fingerprint as one checkpoint.

    Everything is validated before anything is written, and a complete checkpoint is renamed into
    place from a scratch directory beside it, so a failed or interrupted save leaves no checkpoint
    under the final name and never touches an existing one; a failed save removes its partial
    files, and each save removes those of killed ones. A SHA-256 digest of every saved array is
    recorded and verified by :func:`restore`.

    Args:
        directory: the checkpoint directory, or with ``step`` the root holding ``<step>/``.
        adapters: the adapter pytree (``LoraFactors`` of arrays, and :class:`jlora.Trainable`
            extras, saved exactly; sharded ``jax.Array`` s work).
        config: the config the adapters were made with (stored as JSON; scales derive from it).
        step: save to ``directory/<step>/`` (the layout of orbax's ``CheckpointManager``).
        base: optional base parameters; their paths, shapes and dtypes are recorded so that
            restoring onto another base fails clearly.
        base_digest: with ``base``, also record a SHA-256 of each base weight's bytes, so that
            another checkpoint of the same architecture is refused too; hashing costs about a
            second per GB of base (pass False to skip it for huge bases).
        magnitudes: DoRA's magnitudes ``{path: m}`` (:func:`jlora.variants.dora_magnitudes`,
            :func:`jlora.variants.nnx_magnitudes`) for these adapters, saved beside their
            factors; :func:`restore` with ``magnitudes=True`` returns them.

    Returns:
        The path of the new checkpoint.

    Raises:
        FileExistsError: the target directory exists (choose another step or remove it).
        OSError: the directory cannot be created, or writing failed (a full disk): one error
            naming the checkpoint and the cause; nothing is left under the final name.
        AdapterMismatchError: the adapters do not match ``config`` or ``base``, or a magnitude
            has no adapter or does not fit it (shape ``(*stack, *fan_out)``).
        TypeError: ``config`` is not a :class:`jlora.LoraConfig`.
        ValueError: ``step`` is not an integer >= 0.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jlora
        >>> from jlora import checkpoint
        >>> params = {"w": jnp.ones((4, 3))}
        >>> config = jlora.LoraConfig(targets="w", rank=2)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> root = tempfile.mkdtemp()
        >>> checkpoint.save(root, adapters, config, step=100, base=params).name
        '100'
        >>> restored, restored_config = checkpoint.restore(root)
        >>> restored_config == config, restored["w"].a.shape
        (True, (4, 2))
        >>> params["head"] = jnp.arange(3.0)
        >>> config = jlora.LoraConfig(targets="w", rank=2, trainable=("head",))
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> restored, _ = checkpoint.restore(checkpoint.save(root, adapters, config, step=101))
        >>> restored["head"].value.tolist()
        [0.0, 1.0, 2.0]
    """
    root = _dirs.absolute(_checks.path(directory, "directory"))  # orbax needs absolute paths
    path = root if step is None else root / str(_check_step(step))
    _checks.flag(base_digest, "base_digest")
    args = save_args(adapters, config, base=base, base_digest=base_digest, magnitudes=magnitudes)
    if _dirs.lexists(path):
        raise FileExistsError(
            f"{path}: already exists; jlora.checkpoint.save never overwrites a checkpoint. Save "
            "under a new step or directory, or remove this one first"
        )
    if not _dirs.is_local(path):  # orbax commits remote checkpoints its own way
        try:
            _write(path, args)
        except Exception as e:
            _raise_write_failed(path, e, "orbax's partial files may remain beside it")
        return path
    scratch = _scratch_for(path)
    target = scratch.path / "checkpoint"
    try:
        _write(target, args)
    except Exception as e:
        removed = scratch.discard()
        left = f"the partial files in {scratch.path} are removed by the next save"
        _raise_write_failed(path, e, "the partial files were removed" if removed else left)
    except BaseException:  # KeyboardInterrupt, SystemExit
        scratch.discard()
        raise
    try:
        _atomic.place(target, path, scratch)
    except BaseException:
        scratch.discard()
        raise
    scratch.remove()
    return path


def _scratch_for(path: epath.Path) -> _atomic.Scratch:
    """The scratch directory of a save to ``path``, after removing dead saves' leftovers."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic.remove_dead_saves(path.parent)
        return _atomic.Scratch.create(path, kind="save")
    except OSError as e:
        where = next((p for p in (path.parent, *path.parent.parents) if _dirs.lexists(p)), None)
        why = (
            f"{where} is not a directory"
            if where is not None and not where.is_dir()
            else f"{type(e).__name__}: {e.strerror or first_line(e)}"
        )
        raise OSError(
            e.errno,
            f"{path}: cannot create the checkpoint's directory ({why}); expected a writable "
            "directory path. Choose another directory, or fix its permissions",
        ) from None


_IO_STATUS = re.compile(
    r"RESOURCE_EXHAUSTED|PERMISSION_DENIED|OUT_OF_RANGE|UNAVAILABLE|DATA_LOSS|os_error_code"
)


def _write(target: epath.Path, args: ocp.args.Composite) -> None:
    """orbax's save of ``args`` to ``target``; after a failure, once its writes have stopped."""
    with _orbax_writes.quiet_writes(target.parent):
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(target, args=args)


def _raise_write_failed(path: epath.Path, e: Exception, partial: str) -> None:
    """Raises one ``OSError`` for a write that failed on the file system, else ``e`` itself."""
    text = str(e)
    if not isinstance(e, OSError) and not _IO_STATUS.search(text):
        raise e
    code = e.errno if isinstance(e, OSError) else None
    found = re.search(r"os_error_code='?(\d+)", text)
    if code is None and found:
        code = int(found[1])
    cause = os.strerror(code) if code else first_line(e)
    fix = {
        errno.ENOSPC: "Free space",
        errno.EDQUOT: "Free space (or raise your quota)",
        errno.EFBIG: "Raise the file size limit (ulimit -f)",
        errno.EACCES: "Fix the directory's permissions",
        errno.EROFS: "Choose a writable file system",
    }.get(code, "Check the file system (space, permissions)")
    raise OSError(
        code,
        f"{path}: writing the adapter checkpoint failed ({cause}); nothing was saved there and "
        f"{partial}. {fix} and save again",
    ) from None
