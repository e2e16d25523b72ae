"""Adapter banks from disk: jlora adapter checkpoints, and PEFT's multi-adapter directories.

PEFT's ``save_pretrained`` writes the adapter called ``"default"`` in the directory itself and
every other adapter in a subdirectory named after it (``out/``, ``out/french/``, ...); each holds
``adapter_config.json`` and ``adapter_model.safetensors``. :func:`from_peft` reads that layout,
one bank slot per adapter, with PEFT's own scales (``lora_alpha / r`` per module).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .._errors import BankError


def from_checkpoints(cls: type, params: Any, directories: Mapping[str, Any], **kwargs: Any) -> Any:
    """A bank of ``{name: jlora adapter checkpoint directory}``, each checked against ``params``.

    Keyword arguments go to :meth:`AdapterBank.build` (``capacity``, ``max_rank``, ``dtype``).
    """
    from .. import checkpoint

    adapters = {
        name: checkpoint.restore(directory, base=params) for name, directory in directories.items()
    }
    return cls.build(params, adapters, **kwargs)


def peft_adapters(directory: Any) -> dict[str, str]:
    """``{adapter name: directory}`` of PEFT's multi-adapter layout under ``directory``."""
    from ..peft import CONFIG_NAME

    directory = os.fspath(directory)
    found = {}
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        found["default"] = directory
    for entry in sorted(os.listdir(directory)):
        sub = os.path.join(directory, entry)
        if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            found[entry] = sub
    if not found:
        raise BankError(
            f"{directory}: no PEFT adapter here ({CONFIG_NAME} in the directory or in its "
            "subdirectories, one per adapter name, as PEFT's save_pretrained writes them)"
        )
    return found


def from_peft(
    cls: type,
    params: Any,
    directory: Any,
    *,
    names: list[str] | None = None,
    module_to_path: Any = None,
    **kwargs: Any,
) -> Any:
    """A bank of the PEFT adapters under ``directory`` (``"default"`` first if present, then the
    subdirectories by name), or only ``names`` in that order.

    ``module_to_path`` goes to :func:`jlora.peft.load`; other keyword arguments to
    :meth:`AdapterBank.build`.
    """
    from .. import peft

    found = peft_adapters(directory)
    order = ["default", *(n for n in found if n != "default")] if names is None else names
    extra = {} if module_to_path is None else {"module_to_path": module_to_path}
    adapters = {}
    for name in order:
        if name not in found:
            raise BankError(f"{directory}: no PEFT adapter named {name!r}; found {list(found)}")
        adapters[name] = peft.load(found[name], params, **extra)
    return cls.build(params, adapters, **kwargs)
