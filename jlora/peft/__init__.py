"""Hugging Face PEFT's LoRA adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A torch ``nn.Linear`` stores its weight ``W: (out, in)``, and PEFT adapts it as

    y = x W^T + s (x A^T) B^T        lora_A.weight = A: (r, in),  lora_B.weight = B: (out, r)

while a Flax kernel is ``(in, out)`` and jlora computes ``y = x W0 + s (x a) b`` with
``a: (in, r)``, ``b: (r, out)``: so ``A = a^T`` and ``B = b^T``. An ``nn.Embedding`` adds
``s A^T[ids] B^T`` with ``lora_embedding_A = A: (r, vocab)``, ``lora_embedding_B = B: (d, r)``;
jlora's table factors ``a: (vocab, r)``, ``b: (r, d)`` again give ``A = a^T``, ``B = b^T``. The
scale ``s`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) in both libraries, so
per-weight ranks and alphas travel as PEFT's ``rank_pattern`` / ``alpha_pattern``.

Tensors are named ``base_model.model.<module>.lora_A.weight`` (``lora_B.weight``,
``lora_embedding_A``, ``lora_embedding_B``), ``<module>`` being the torch module's dotted name, and
stored as float32. Which Flax path is which module is up to two functions; the defaults,
:func:`path_to_module` and :func:`module_to_path`, map ``a/b/c/kernel`` and ``a/b/c/embedding`` to
``a.b.c``. PEFT's format has one 2-D pair per module: adapters of stacked (scanned) layers,
multi-axis kernels and convolutions are refused with a message saying how to reshape them.

DoRA adapters (``use_dora``) add each module's ``lora_magnitude_vector``: :func:`save` with
``magnitudes=`` and :func:`load_dora` (``jlora.peft._dora``). PEFT's AdaLoRA files (``lora_A``,
``lora_E``, ``lora_B`` triplets) are read by :func:`load_adalora` (``jlora.peft._adalora``).

Trainable extras (:class:`jlora.Trainable`, ``LoraConfig.trainable``) are PEFT's
``modules_to_save``: ``adapter_config.json`` lists their modules and each tensor is stored under the
module's own name, ``base_model.model.<module>.weight`` (a Linear weight is the kernel transposed)
or ``.bias``. PEFT saves and loads *whole* modules, so make ``trainable`` cover every parameter of
such a module (``"classifier/.*"``), or PEFT will miss the others when it loads the file.
"""

from __future__ import annotations

from .._errors import PeftFormatError as PeftFormatError
from ._adalora import load_adalora as load_adalora
from ._files import CONFIG_NAME as CONFIG_NAME
from ._files import WEIGHTS_NAME as WEIGHTS_NAME
from ._load import load as load
from ._load import load_dora as load_dora
from ._names import module_to_path as module_to_path
from ._names import path_to_module as path_to_module
from ._save import save as save

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PeftFormatError",
    "load",
    "load_adalora",
    "load_dora",
    "module_to_path",
    "path_to_module",
    "save",
]
