"""PEFT's DoRA adapters (``use_dora=True``): the magnitude vector beside each module's factors.

PEFT names it ``base_model.model.<module>.lora_magnitude_vector`` in the file (the state-dict key
``lora_magnitude_vector.<adapter>.weight`` with the adapter name and ``.weight`` removed, as PEFT's
``get_peft_model_state_dict`` writes it). It is ``||W + s B A||`` over ``dim=1`` of the torch
``(out, in)`` weight: one value per output feature, the norm over the input features. jlora's
magnitude ``m: (fan_out,)`` is the norm over the fan-in of each column of the ``(in, out)``
kernel: the same vector, with no transpose. Both libraries then compute
``(x W0 + s (x a) b) m / ||W0 + s a b||_c + bias`` (:mod:`jlora.variants._dora_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import PeftFormatError
from .._factors import LoraFactors
from .._paths import leaves_with_paths

NAME = "lora_magnitude_vector"


def check_kind(use_dora: bool, dora: bool, where: str) -> None:
    """Refuses a DoRA file to ``load`` and a plain one to ``load_dora``."""
    if use_dora and not dora:
        raise PeftFormatError(
            f"{where}: use_dora is true: a DoRA adapter (a magnitude per output unit beside the "
            "factors), which load would read as plain LoRA. Read it with jlora.peft.load_dora"
        )
    if dora and not use_dora:
        raise PeftFormatError(
            f"{where}: use_dora is not true: a plain LoRA adapter, with no magnitudes. Read it "
            "with jlora.peft.load"
        )


def magnitudes_for(table: Mapping[str, LoraFactors], magnitudes: Any) -> dict[str, Any]:
    """``{path: m}`` for exactly the adapters of ``table``, checked.

    Raises:
        PeftFormatError: a magnitude has no adapter, or an adapter has no magnitude.
    """
    dora = dict(leaves_with_paths(magnitudes))
    for path in dora:
        if path not in table:
            raise PeftFormatError(
                f"{path}: a DoRA magnitude without an adapter at this path; pass the magnitudes "
                "of these adapters (jlora.variants.dora_magnitudes, then trained)"
            )
    for path in table:
        if path not in dora:
            raise PeftFormatError(
                f"{path}: this adapter has no DoRA magnitude, but a PEFT use_dora file makes "
                "every target module DoRA (PEFT would start its magnitude at the weight's norm). "
                "Pass a magnitude for every adapter, or save plain LoRA (magnitudes=None)"
            )
    return dora


def vector(path: str, kind: str, dora: Mapping[str, Any], b_t: np.ndarray) -> np.ndarray:
    """One module's ``lora_magnitude_vector``: ``(out,)`` float32.

    Raises:
        PeftFormatError: the adapter is an embedding's, or the magnitude does not fit.
    """
    if kind != "linear":
        raise PeftFormatError(
            f"{path}: DoRA on an embedding table: jlora's DoRA layers are Linear ones (a norm "
            "per output unit of a kernel). Leave the embedding out of the DoRA adapter"
        )
    m = np.asarray(jax.device_get(dora[path])).astype(np.float32)
    if m.size != b_t.shape[0]:
        raise PeftFormatError(
            f"{path}: DoRA magnitude of shape {m.shape} for a module with {b_t.shape[0]} output "
            "features; expected one per output unit (jlora.variants.dora_magnitudes)"
        )
    return np.ascontiguousarray(m.reshape(-1))


def read_magnitudes(
    by_path: Mapping[str, tuple[str, dict[str, Any]]], use_dora: bool, where: str
) -> dict[str, jax.Array]:
    """``{path: m}`` (float32) from the grouped tensors of a loaded file.

    Raises:
        PeftFormatError: ``use_dora`` and a module lacks its magnitude (or has a misshapen one),
            or magnitudes without ``use_dora``.
    """
    out = {}
    for path, (module, entry) in by_path.items():
        m = entry.get("M")
        if m is None:
            if use_dora:
                raise PeftFormatError(
                    f"{where}: use_dora is true but module {module!r} has no {NAME} tensor; "
                    "every adapted module of a DoRA adapter needs one"
                )
            continue
        if not use_dora:
            raise PeftFormatError(
                f"{where}: module {module!r} has a {NAME} tensor but the config's use_dora is "
                "not true; the pair is inconsistent"
            )
        if m.ndim != 1 or m.shape[0] != entry["B"].shape[0]:
            raise PeftFormatError(
                f"{where}: module {module!r}: {NAME} has shape {m.shape}; expected "
                f"({entry['B'].shape[0]},), one per output feature"
            )
        out[path] = jnp.asarray(np.asarray(m).astype(np.float32))
    return out
