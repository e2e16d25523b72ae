"""Reading a base checkpoint a group of leaves at a time, and writing the merged one (orbax I/O).

The driver (``_disk_merge``) and the quantising merge (``jlora.quant``) share these: the base's
leaves from its orbax metadata, their grouping by size, the partial restore of one group, orbax's
partial save of one group into the unfinished output and its finalisation, and the errors that
name a damaged input or a failed write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from .. import _dirs
from .._errors import DamagedCheckpointError
from .._paths import key_to_str, nest
from ._steps import RECORD

_METADATA = "_METADATA"


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


def _pytree_dir(base: epath.Path) -> epath.Path:
    if not base.is_dir():
        what = "is a file" if _dirs.lexists(base) else "no such directory"
        raise FileNotFoundError(f"base {base}: {what}; expected an orbax checkpoint directory")
    if (base / "adapter_config.json").is_file():
        raise ValueError(
            f"base {base} is a PEFT adapter; expected the base model's orbax PyTree checkpoint "
            "(load PEFT adapters with jlora.peft.load, then save them with jlora.checkpoint.save "
            "to merge on disk)"
        )
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
    except Exception as e:
        raise _damaged(pytree_dir, "its metadata (_METADATA) cannot be read", e) from None
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
    try:
        restored = handler.restore(
            pytree_dir,
            args=ocp.args.PyTreeRestore(
                item=nest(item), restore_args=nest(args), partial_restore=True
            ),
        )
    except Exception as e:
        what = f"leaves {group[0].path} .. {group[-1].path} cannot be read"
        raise _damaged(pytree_dir, what, e) from None
    values = {}
    for leaf in group:
        node = restored
        for key in leaf.keys:
            node = node[key]
        values[leaf.path] = node
    return values


def _damaged(where: epath.Path, what: str, e: BaseException) -> DamagedCheckpointError:
    lines = str(e).strip().splitlines()
    line = lines[0][:200] if lines else ""
    return DamagedCheckpointError(
        f"the checkpoint at {where} is damaged: {what} ({type(e).__name__}: {line}). A file is "
        "missing, truncated or corrupt; use an intact copy of the base checkpoint"
    )


def _write_failed(scratch: epath.Path, out: epath.Path, e: BaseException) -> OSError:
    lines = str(e).strip().splitlines()
    line = lines[0][:200] if lines else ""
    return OSError(
        f"writing the merged checkpoint failed ({type(e).__name__}: {line}); the partial "
        f"checkpoint in {scratch} was removed and {out} was not touched. Is the disk full? Free "
        "space (the merged checkpoint is as large as the base) and merge again"
    )


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


def _can_skip_host_copy(memory: Any) -> bool:
    """Whether orbax's memory options have ``deepcopy_host_arrays`` (orbax 0.12.0 has not)."""
    fields = dataclasses.fields(memory) if dataclasses.is_dataclass(memory) else ()
    return any(field.name == "deepcopy_host_arrays" for field in fields)


def _no_host_copy() -> Any:
    """The caller's orbax context (or the default) with the copy of NumPy arrays before a save off.

    orbax copies each host array before its asynchronous write, in case the caller changes it
    meanwhile; ``_write_group`` waits for the write and never changes the arrays, so the copy
    (about a third of the write's CPU time) is not needed. The context returned is a new one
    inheriting every option of the active context (``ocp.v1.Context(parent)`` deep-copies them),
    so the only option changed is on jlora's own copy: a user's context, and any options it shares,
    stay as they are. orbax versions without the option (0.12.0) keep copying, under the caller's
    context unchanged.
    """
    active = _active_context()
    if not _can_skip_host_copy(getattr(active, "memory", None)):
        return contextlib.nullcontext()
    context = ocp.v1.Context(active)  # new option objects, copied from the active context's
    context.memory.deepcopy_host_arrays = False
    return context


def _active_context() -> Any:
    """The orbax context a save would use now (the innermost ``with ocp.v1.Context()``, or a
    default one), or None where this orbax does not expose it as jlora expects."""
    try:  # orbax has no public accessor; its partial save reads the same one
        from orbax.checkpoint.experimental.v1._src.context import context as context_lib

        return context_lib.get_context()
    except (ImportError, AttributeError):  # pragma: no cover - depends on the installed orbax
        return None


def _write_group(target: epath.Path, values: dict[str, Any]) -> None:
    """Appends ``values`` to the unfinished checkpoint ``target``; returns once written."""
    with _no_host_copy():
        _partial_api().save(target, nest(values))


def _finalize(target: epath.Path) -> None:
    _partial_api().finalize(target)


def _only_pytree(target: epath.Path) -> epath.Path:
    found = [d for d in target.iterdir() if d.is_dir() and (d / "_METADATA").exists()]
    if len(found) != 1:
        raise RuntimeError(
            f"{target}: orbax's partial save wrote {sorted(d.name for d in found)} PyTree "
            "directories, expected one; this orbax-checkpoint version lays checkpoints out "
            "differently from those jlora was tested with"
        )
    return found[0]
