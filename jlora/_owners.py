"""Whether a scratch directory's owner is provably dead (the rule is in :mod:`jlora._atomic`): its
journal's process id and start time, on this host, against ``/proc``."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from etils import epath

JOURNAL = "journal.json"


def _start_time(pid: int) -> str | None:
    # Field 22 of /proc/<pid>/stat: the process's start time since boot, in clock ticks.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return start is None or _start_time(pid) in (None, start)

def _journal(scratch: epath.Path) -> dict[str, Any] | None:
    try:
        data = json.loads((scratch / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _owner_dead(name_pid: str | None, journal: dict[str, Any] | None) -> bool:
    if journal is not None:
        if journal.get("host") != socket.gethostname() or not isinstance(journal.get("pid"), int):
            return False
        return not _alive(journal["pid"], journal.get("start"))
    return name_pid is not None and not _alive(int(name_pid), None)
