"""Saving adapters with their config as one orbax checkpoint (restoring it: ``_ckpt_restore``).

A checkpoint is an orbax composite checkpoint with two items: ``adapters`` (the factor arrays, and
the arrays of trainable extras, as a nested dict mirroring the parameter paths) and ``jlora`` (JSON:
the config, each adapter's layout and shapes, each extra's shape and dtype, a SHA-256 digest of
every array, and optionally a fingerprint of the base; see ``_ckpt_format``). It is the layout orbax's
``CheckpointManager`` writes for ``save_args(...)``, so periodic checkpoints under a root
directory (``root/<step>/``) and single checkpoints read back the same way.

Orbax writes into a temporary directory and renames it into place once everything is on disk, so an
interrupted save leaves no directory under the final name; and ``save`` refuses an existing target
rather than deleting it first (orbax's ``force=True`` removes the old checkpoint before writing).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from . import _ckpt_format as fmt
from . import _dirs
from ._config import LoraConfig
from ._errors import DamagedCheckpointError
from ._extras import Trainable
from ._factors import LoraFactors
from ._paths import nest

ARRAYS = "adapters"
RECORD = "jlora"

PathLike = str | os.PathLike


def _arrays_tree(table: dict[str, LoraFactors], extras: dict[str, Trainable]) -> dict[str, Any]:
    # An extra's array sits at its own path: a weight's path is never a prefix of another's.
    arrays = {path: {"a": f.a, "b": f.b} for path, f in table.items()}
    return nest({**arrays, **{path: e.value for path, e in extras.items()}})


def save_args(
    adapters: Any, config: LoraConfig, *, base: Any | None = None, base_digest: bool = True
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
            values this process can read whole); costs one pass over the base (``_ckpt_base``).

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
    return ocp.args.Composite(
        **{
            ARRAYS: ocp.args.StandardSave(_arrays_tree(table, extras)),
            RECORD: ocp.args.JsonSave(fmt.record(table, config, base, extras, base_digest)),
        }
    )


def _is_checkpoint(path: epath.Path) -> bool:
    return (path / RECORD).is_dir() and (path / ARRAYS).is_dir()


def steps(directory: PathLike) -> list[int]:
    """The steps saved under ``directory`` (``directory/<step>/`` checkpoints), ascending.

    Half-written checkpoints (orbax's temporary directories) are not steps.

    Example:
        >>> import tempfile
        >>> steps(tempfile.mkdtemp())
        []
    """
    root = epath.Path(directory)
    if not root.is_dir():
        return []
    found = [int(p.name) for p in root.iterdir() if p.name.isdigit() and _is_checkpoint(p)]
    return sorted(found)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: {step!r} is invalid; expected an integer >= 0 (or None)")
    return step


def resolve(directory: PathLike, step: int | None) -> epath.Path:
    root = epath.Path(directory)
    if step is not None:
        path = root / str(_check_step(step))
        if not _is_checkpoint(path):
            raise FileNotFoundError(
                f"{path}: no adapter checkpoint for step {step}; steps saved under {root}: "
                f"{steps(root)}"
            )
        return path
    if _is_checkpoint(root):
        return root
    found = steps(root)
    if not found:
        raise FileNotFoundError(
            f"{root}: no adapter checkpoint here, and no step directories holding one; expected a "
            "directory written by jlora.checkpoint.save (or a CheckpointManager root of them)"
        )
    return root / str(found[-1])


def save(
    directory: PathLike,
    adapters: Any,
    config: LoraConfig,
    *,
    step: int | None = None,
    base: Any | None = None,
    base_digest: bool = True,
) -> epath.Path:
    """Saves adapters, their config and (optionally) a base fingerprint as one checkpoint.

    Everything is validated before anything is written, and orbax renames a complete temporary
    directory into place, so a failed or interrupted save leaves no checkpoint under the final name
    and never touches an existing one. A SHA-256 digest of every saved array is recorded and
    verified by :func:`restore`.

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

    Returns:
        The path of the new checkpoint.

    Raises:
        FileExistsError: the target directory exists (choose another step or remove it).
        AdapterMismatchError: the adapters do not match ``config`` or ``base``.
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
    root = _dirs.absolute(directory)  # orbax needs absolute paths
    path = root if step is None else root / str(_check_step(step))
    args = save_args(adapters, config, base=base, base_digest=base_digest)
    if path.exists():
        raise FileExistsError(
            f"{path}: already exists; jlora.checkpoint.save never overwrites a checkpoint. Save "
            "under a new step or directory, or remove this one first"
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=args)
    return path


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:200] + " ..."


def read_record(path: epath.Path) -> dict:
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(
                path, args=ocp.args.Composite(**{RECORD: ocp.args.JsonRestore()})
            )
        return restored[RECORD]
    except Exception as e:
        raise DamagedCheckpointError(
            f"the checkpoint at {path} is damaged: its record {path / RECORD / 'metadata'} cannot "
            f"be read ({type(e).__name__}: {first_line(e)}). Restore an intact copy, or save "
            "the adapters again"
        ) from None


def saved_record(directory: PathLike, step: int | None = None) -> fmt.Record:
    """The validated JSON record of the adapter checkpoint at ``directory`` (or its ``step``)."""
    path = resolve(_dirs.absolute(directory), step)
    return fmt.parse(read_record(path), str(path))
