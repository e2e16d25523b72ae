"""Replacing a directory by a complete new one so that a kill at any moment loses nothing.

``merge_checkpoint`` assembles its output in a scratch directory next to ``out``,
``.<out>.jlora-merge-<pid>-<tag>``, which holds a journal (``journal.json``: the owning process's id,
start time and host, the output's name, and a state). Replacing ``out`` is two renames:

    state "swapping"  ->  out -> scratch/previous  ->  scratch/<new> -> out  ->  state "done"

A kill can leave ``out`` missing between the renames, with the old checkpoint in ``previous`` and
the new, complete one in the scratch directory. :func:`recover` repairs that: for a scratch
directory whose owner is dead and whose journal says ``"swapping"`` it completes the swap (the new
checkpoint is complete before that state is written), else it moves ``previous`` back; then it
deletes the scratch directory. Scratch directories of dead owners in any other state (a merge
killed while writing, or after the swap) are deleted too. A scratch directory is *provably* a dead
merge's when its journal (or, before the journal exists, its name) gives a process id on this host
that no longer runs, or now belongs to a process started at another time (a reused id). Those of
live processes, or of other hosts, are left alone.

The swap and the recovery hold an exclusive ``flock`` on ``out``'s parent directory, so a recovery
never runs between another live merge's two renames. All this is for local file systems; on remote
ones (``gs://``) the swap is the same two renames, without the lock and the liveness test.

``jlora.checkpoint.save`` has orbax write into a scratch directory of its own,
``.<name>.jlora-save-<pid>-<tag>`` (same journal), and renames the finished checkpoint into place
with :func:`place`, which never replaces anything. A save that fails removes its scratch directory
once orbax's writes have stopped (or, if some are still running, marks it ``"failed"`` for the next
save to remove); :func:`remove_dead_saves`, run by every save, deletes those and the scratch
directories of killed saves (dead owners, as above). Only the rename makes a checkpoint visible, so
a kill leaves the old state and, at worst, a scratch directory the next save removes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
import uuid

from etils import epath

from ._dirs import is_local, is_symlink, lexists
from ._durable import _fsync_dir, _write_atomically, locked
from ._owners import JOURNAL, _journal, _owner_dead, _start_time

PREVIOUS = "previous"
_INFIX = {"merge": ".jlora-merge-", "save": ".jlora-save-"}
_NAME = re.compile(r"^\.(?P<out>.+)\.jlora-merge-(?:(?P<pid>\d+)-)?(?P<tag>[0-9a-f]{12})$")
_SAVE_NAME = re.compile(r"^\.(?P<out>.+)\.jlora-save-(?P<pid>\d+)-(?P<tag>[0-9a-f]{12})$")


@dataclasses.dataclass
class Scratch:
    """A merge's scratch directory and its journal."""

    path: epath.Path
    out_name: str

    @classmethod
    def create(cls, out: epath.Path, kind: str = "merge") -> Scratch:
        """Makes ``.<out>.jlora-<kind>-<pid>-<tag>`` next to ``out`` and writes its journal."""
        pid = os.getpid()
        name = f".{out.name}{_INFIX[kind]}{pid}-{uuid.uuid4().hex[:12]}"
        scratch = cls(out.parent / name, out.name)
        scratch.path.mkdir()
        scratch.write_state("writing")
        return scratch

    def write_state(self, state: str, new: str | None = None) -> None:
        """Records ``state`` (and the new checkpoint's path inside the scratch directory)."""
        pid = os.getpid()
        journal = {
            "out": self.out_name,
            "pid": pid,
            "start": _start_time(pid),
            "host": socket.gethostname(),
            "state": state,
            "new": new,
        }
        _write_atomically(self.path / JOURNAL, json.dumps(journal))

    def remove(self) -> None:
        self.path.rmtree(missing_ok=True)

    def discard(self) -> bool:
        """Marks a failed save's scratch directory ``"failed"`` and removes it.

        Returns:
            Whether it is gone; if a late write of orbax's keeps it (the directory is not empty
            when deleted), the next save removes it (:func:`remove_dead_saves`).
        """
        try:
            self.write_state("failed")
        except OSError:
            pass
        for attempt in range(5):
            try:
                self.path.rmtree(missing_ok=True)
                return True
            except OSError:
                time.sleep(0.05 * (attempt + 1))
        return False



def swap(new: epath.Path, out: epath.Path, scratch: Scratch) -> None:
    """Moves the complete checkpoint ``new`` (inside ``scratch``) to ``out``, recoverably."""
    with locked(out.parent):
        scratch.write_state("swapping", os.path.relpath(os.fspath(new), os.fspath(scratch.path)))
        if lexists(out):
            previous = scratch.path / PREVIOUS
            out.rename(previous)
            try:
                new.rename(out)
            except BaseException:
                previous.rename(out)
                raise
        else:
            new.rename(out)
        if is_local(out):
            _fsync_dir(os.fspath(out.parent))
        scratch.write_state("done")


def place(new: epath.Path, out: epath.Path, scratch: Scratch) -> None:
    """Renames the complete checkpoint ``new`` (inside ``scratch``) to ``out``, which must not exist.

    Raises:
        FileExistsError: something appeared at ``out`` while ``new`` was written.
    """
    with locked(out.parent):
        if lexists(out):
            raise FileExistsError(
                f"{out}: appeared while this checkpoint was being written (another save to the "
                "same directory?); jlora.checkpoint.save never overwrites a checkpoint. Save "
                "under a new step or directory"
            )
        new.rename(out)
        if is_local(out):
            _fsync_dir(os.fspath(out.parent))
        scratch.write_state("done")


def remove_dead_saves(parent: epath.Path) -> list[str]:
    """Deletes the scratch directories of saves under ``parent`` that can no longer finish.

    Those are the directories of killed saves (owner dead, see the module docstring) and those
    this process's own failed saves could not remove at once (journal state ``"failed"``). Live
    saves' directories, other hosts' and anything not named like a save's are left alone.

    Returns:
        One line per directory removed.
    """
    if not is_local(parent) or not parent.is_dir():
        return []
    actions = []
    with locked(parent):
        for scratch in sorted(parent.iterdir()):
            match = _SAVE_NAME.match(scratch.name)
            if match is None or not scratch.is_dir() or is_symlink(scratch):
                continue
            journal = _journal(scratch)
            mine_failed = (
                journal is not None
                and journal.get("pid") == os.getpid()
                and journal.get("host") == socket.gethostname()
                and journal.get("state") == "failed"
            )
            if mine_failed or _owner_dead(match["pid"], journal):
                try:
                    scratch.rmtree(missing_ok=True)
                except OSError:  # still being written to: the next save tries again
                    continue
                actions.append(f"removed {scratch}, left by a save that did not finish")
    return actions



def recover(out: epath.Path) -> list[str]:
    """Repairs ``out`` after killed merges and deletes their scratch directories.

    Returns:
        One line per action taken (restored, completed, removed), for the caller to report.
    """
    parent = out.parent
    if not is_local(out) or not parent.is_dir():
        return []
    actions = []
    with locked(parent):
        for scratch in sorted(parent.iterdir()):
            match = _NAME.match(scratch.name)
            if match is None or match["out"] != out.name or not scratch.is_dir():
                continue
            journal = _journal(scratch)
            if journal is not None and journal.get("out") != out.name:
                continue
            legacy = match["pid"] is None and journal is None  # written before the journal
            if legacy:
                previous = scratch / PREVIOUS
                if not lexists(out) and lexists(previous):
                    previous.rename(out)
                    actions.append(f"restored {out} from {previous} (an interrupted --overwrite)")
                continue
            if not _owner_dead(match["pid"], journal):
                continue
            state = (journal or {}).get("state")
            if not lexists(out):
                new = (
                    scratch / journal["new"] if state == "swapping" and journal.get("new") else None
                )
                if new is not None and new.is_dir():
                    new.rename(out)
                    actions.append(f"completed the interrupted replacement of {out}")
                elif lexists(scratch / PREVIOUS):
                    (scratch / PREVIOUS).rename(out)
                    actions.append(f"restored {out} from an interrupted replacement")
            scratch.rmtree(missing_ok=True)
            actions.append(f"removed {scratch}, left by a merge that did not finish")
    return actions
