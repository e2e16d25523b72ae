"""Writing a PEFT adapter's two files as a pair: staged, synced, renamed in (see ``_files``)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from .. import _digest
from .._errors import PeftFormatError
from ._files import (
    CONFIG_DIGEST,
    CONFIG_NAME,
    TENSORS_DIGEST,
    WEIGHTS_NAME,
    _load_json,
    _staged,
    _staged_config,
    config_digest,
    read_metadata,
)


def write_files(
    directory: str | os.PathLike[str], tensors: dict[str, np.ndarray], config: dict[str, Any]
) -> None:
    """Writes both files into ``directory`` (created if missing) as a pair (module docstring)."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    metadata = {
        "format": "pt",
        TENSORS_DIGEST: _digest.tensors_digest(tensors),
        CONFIG_DIGEST: config_digest(config),
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _complete_interrupted_save(directory)
    for stale in _staged(directory, WEIGHTS_NAME) + _staged(directory, CONFIG_NAME):
        os.unlink(stale)
    _replace_files(
        directory,
        {
            WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata=metadata),
            CONFIG_NAME: lambda p: _write_text(p, text),
        },
    )


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # e.g. a directory on a file system that cannot sync one
        pass
    finally:
        os.close(fd)


def _replace_files(directory: str, writers: dict[str, Callable]) -> None:
    # Stage every file under a temporary name first, then rename them in: a failure while writing
    # leaves the previous files untouched, and the renames themselves are atomic.
    staged: list[tuple[str, str]] = []
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            staged.append((tmp, os.path.join(directory, name)))
            write(tmp)
            _fsync(tmp)
        for tmp, final in staged:
            os.replace(tmp, final)
        _fsync(directory)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _complete_interrupted_save(directory: str) -> None:
    weights = os.path.join(directory, WEIGHTS_NAME)
    config = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(weights):
        return
    try:
        expected = read_metadata(weights).get(CONFIG_DIGEST)
        current = config_digest(_load_json(config)) if os.path.isfile(config) else None
    except (OSError, ValueError, PeftFormatError):
        return
    if expected is not None and current != expected:
        staged = _staged_config(directory, expected)
        if staged is not None:
            os.replace(staged[0], config)
