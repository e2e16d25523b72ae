"""Where adapter checkpoints lie on disk, and reading one's JSON record (saving: ``_adapters``).

An adapter checkpoint is a directory holding two orbax items, ``adapters`` (the arrays) and
``jlora`` (the record); ``CheckpointManager`` roots hold them as ``root/<step>/``. :func:`steps`
lists a root's steps, :func:`resolve` turns a directory (and step) into one checkpoint, and
:func:`read_record` reads its record (``_parse`` validates it).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from .. import _checks, _dirs
from .._errors import DamagedCheckpointError

ARRAYS = "adapters"
RECORD = "jlora"

PathLike = str | os.PathLike


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
    root = epath.Path(_checks.path(directory, "directory"))
    if not root.is_dir():
        if _dirs.lexists(root):
            raise NotADirectoryError(
                f"directory {root}: is a file; expected a directory holding <step>/ checkpoints "
                "(or a missing one: no steps)"
            )
        return []
    found = [int(p.name) for p in root.iterdir() if p.name.isdigit() and _is_checkpoint(p)]
    return sorted(found)


def _check_step(step: Any) -> int:
    return _checks.step(step)


def resolve(directory: PathLike, step: int | None) -> epath.Path:
    root = epath.Path(_checks.path(directory, "directory"))
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
            + _what_it_is(root)
        )
    return root / str(found[-1])


def _what_it_is(root: epath.Path) -> str:
    """A hint naming a directory of another kind than an adapter checkpoint, or ''."""
    if (root / "adapter_config.json").is_file():
        return f". {root} holds a PEFT adapter: read it with jlora.peft.load"
    if (root / "_METADATA").is_file():
        return f". {root} is an orbax PyTree checkpoint (a model's parameters?), not adapters"
    return ""


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
