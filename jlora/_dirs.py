"""Which directories jlora may write over: overlap between inputs and output, and replaceable outputs.

**Overlap.** Two paths name the same directory, or one lies inside the other, when their real paths
(every symlink followed, ``os.path.realpath``) are equal or nested, or when the device and inode
``(st_dev, st_ino)`` of one equals that of the other or of one of its ancestors (bind mounts, and
aliases the real path does not see). :func:`check_no_overlap` compares the output with each input
that way before anything is written, so ``out = alias/base`` with ``alias`` a symlink to the
base's parent is refused like ``out = base``.

**Replaceable outputs.** ``merge_checkpoint(..., overwrite=True)`` replaces an existing output only
if it is a checkpoint jlora could have written (:func:`is_replaceable`): an empty directory, or an
orbax PyTree checkpoint, i.e. a directory holding orbax's ``_METADATA`` file whose top-level entries
are all names orbax writes (``_METADATA``, ``_CHECKPOINT_METADATA``, ``_sharding``,
``manifest.ocdbt``, ``ocdbt.process_*``, ``d``, ``array_metadatas``, ``descriptor``,
``commit_success.txt``). Anything else (a file, a directory of other files, a checkpoint with a
file of the user's beside it) is refused unless the caller forces it.

Remote paths (``gs://...``) are compared as strings only: they have no symlinks or inodes here.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath

_ORBAX_NAMES = frozenset(
    {
        "_METADATA",
        "_CHECKPOINT_METADATA",
        "_ROOT_METADATA",
        "_sharding",
        "manifest.ocdbt",
        "d",
        "array_metadatas",
        "descriptor",
        "commit_success.txt",
        "jlora_quant.json",  # jlora.quant.save writes it beside orbax's files
    }
)


def is_local(path: Any) -> bool:
    """Whether ``path`` is on the local file system (no ``scheme://`` prefix)."""
    return "://" not in os.fspath(path)


def absolute(path: Any) -> epath.Path:
    """``path`` made absolute (relative paths are taken from the working directory).

    Symlinks are kept (only :func:`check_no_overlap` follows them): renaming a symlinked output
    replaces the link, not the directory it points to.
    """
    if is_local(path):
        return epath.Path(os.path.abspath(os.fspath(path)))
    return epath.Path(path)


def lexists(path: Any) -> bool:
    """Whether anything (a dangling symlink included) exists at ``path``."""
    return os.path.lexists(os.fspath(path)) if is_local(path) else epath.Path(path).exists()


def is_symlink(path: Any) -> bool:
    """Whether ``path`` is a symlink (never, on remote file systems)."""
    return is_local(path) and os.path.islink(os.fspath(path))


def _identities(real: str) -> list[tuple[int, int] | None]:
    """``(st_dev, st_ino)`` of ``real`` and each of its ancestors (None where missing)."""
    out = []
    node = real
    while True:
        try:
            st = os.stat(node)
            out.append((st.st_dev, st.st_ino))
        except OSError:
            out.append(None)
        parent = os.path.dirname(node)
        if parent == node:
            return out
        node = parent


def relation(inner: Any, outer: Any) -> str | None:
    """``"same"`` if the two paths name one directory, ``"inside"`` if ``inner`` lies in ``outer``.

    Real paths and device/inode pairs are both compared (see the module docstring); None when
    neither holds.
    """
    if not (is_local(inner) and is_local(outer)):
        a, b = os.fspath(inner).rstrip("/"), os.fspath(outer).rstrip("/")
        return "same" if a == b else "inside" if a.startswith(b + "/") else None
    a, b = os.path.realpath(os.fspath(inner)), os.path.realpath(os.fspath(outer))
    if a == b:
        return "same"
    if os.path.commonpath([a, b]) == b:
        return "inside"
    ids_a, ids_b = _identities(a), _identities(b)
    if ids_a[0] is not None and ids_a[0] == ids_b[0]:
        return "same"
    if ids_b[0] is not None and ids_b[0] in ids_a[1:]:
        return "inside"
    return None


def check_no_overlap(out: Any, inputs: dict[str, Any]) -> None:
    """Raises ``ValueError`` if ``out`` is, contains or lies inside one of ``inputs`` (name: path)."""
    for name, path in inputs.items():
        found = relation(out, path) or ("contains" if relation(path, out) == "inside" else None)
        if found is None:
            continue
        how = {
            "same": "is the same directory as",
            "inside": "lies inside",
            "contains": "contains",
        }[found]
        raise ValueError(
            f"out {out} would overwrite the {name} checkpoint {path}: it {how} it (real paths "
            f"{os.path.realpath(os.fspath(out))} and {os.path.realpath(os.fspath(path))}, "
            "symlinks and bind mounts followed); merge_checkpoint never writes over its inputs. "
            "Choose another output directory"
        )


def is_replaceable(path: epath.Path) -> bool:
    """Whether ``path`` is a directory jlora may replace: empty, or an orbax PyTree checkpoint."""
    if is_symlink(path) or not path.is_dir():
        return False
    names = [p.name for p in path.iterdir()]
    if not names:
        return True
    return "_METADATA" in names and all(
        n in _ORBAX_NAMES or n.startswith("ocdbt.process_") for n in names
    )


def check_replaceable(out: epath.Path, force: bool) -> None:
    """Raises ``FileExistsError`` unless ``out`` may be replaced (or ``force`` says so)."""
    if force or is_replaceable(out):
        return
    if is_symlink(out) or not out.is_dir():
        what = "a symlink" if is_symlink(out) else "a file"
    else:
        others = sorted(
            p.name
            for p in out.iterdir()
            if not (p.name in _ORBAX_NAMES or p.name.startswith("ocdbt.process_"))
        )
        what = (
            f"a directory holding {others[:5]}{' ...' if len(others) > 5 else ''}, "
            "not an orbax PyTree checkpoint (no _METADATA, or files orbax does not write)"
        )
    raise FileExistsError(
        f"out {out} exists and is {what}; overwrite replaces only a checkpoint jlora could have "
        "written (an orbax PyTree checkpoint or an empty directory). Choose another output, "
        "remove it yourself, or pass force=True (--force-replace-non-checkpoint) to replace it"
    )
