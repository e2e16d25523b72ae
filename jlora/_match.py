"""How one target pattern matches a parameter path: regexes, module names and presets.

A target is matched against the ``/``-joined path of a parameter leaf
(``layers_0/attn/query/kernel``) in three ways, any of which selects it:

* a regular expression matching the whole path (``re.fullmatch``): ``".*attn/(query|value)/kernel"``;
* a module name (letters, digits, ``_``, ``-`` and ``/`` only), as in PEFT's ``target_modules``:
  ``"query"`` selects the weight (``kernel`` or ``embedding``) of every module named ``query`` at
  any depth, ``"attn/query"`` of every ``query`` inside an ``attn``;
* the preset ``"all-linear"`` (PEFT's): every linear layer's kernel but the output head. Only the
  Flax transforms know layer kinds and which layer is the head; the functional core, which sees a
  bare pytree, reads it as every leaf named ``kernel`` (convolutions included).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable

ALL_LINEAR = "all-linear"
PRESETS = (ALL_LINEAR,)
WEIGHT_NAMES = ("kernel", "embedding")  # the weight leaves of Flax's Dense/Einsum/Conv/Embed
_NAME = re.compile(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*")


def is_module_name(pattern: str) -> bool:
    """Whether ``pattern`` reads as a module name (or a ``/``-joined module path suffix)."""
    return pattern not in PRESETS and _NAME.fullmatch(pattern) is not None


def names_module(pattern: str, path: str) -> bool:
    """Whether the module-name ``pattern`` names the module owning the weight at ``path``."""
    owner, _, leaf = path.rpartition("/")
    return leaf in WEIGHT_NAMES and (owner == pattern or owner.endswith("/" + pattern))


def matches(pattern: str, path: str) -> bool:
    """Whether target ``pattern`` selects the leaf at ``path`` (see the module docstring).

    Example:
        >>> matches("query", "layers_0/attn/query/kernel"), matches("query", "query/bias")
        (True, False)
        >>> matches(".*/kernel", "dense/kernel"), matches("all-linear", "conv/kernel")
        (True, True)
    """
    if pattern == ALL_LINEAR:
        return path.rpartition("/")[2] == "kernel"
    if re.fullmatch(pattern, path):
        return True
    return is_module_name(pattern) and names_module(pattern, path)


def literal(pattern: str) -> str | None:
    """The one string a regex matches, if it is a plain string (``re.escape`` of it); else None."""
    text = re.sub(r"\\(.)", r"\1", pattern)
    return text if re.escape(text) == pattern else None


def _suffixes(owner: str) -> Iterable[str]:
    parts = owner.split("/")
    return ("/".join(parts[i:]) for i in range(len(parts)))


@functools.lru_cache(maxsize=512)
def matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """``path -> any(matches(p, path) for p in patterns)``, in time independent of how many
    patterns are plain paths or module names (the Flax transforms pass one per adapted weight)."""
    literals = {t for t in map(literal, patterns) if t is not None}
    names = {p for p in patterns if is_module_name(p)}
    preset = ALL_LINEAR in patterns
    regexes = [re.compile(p) for p in patterns if p not in PRESETS and literal(p) is None]

    def match(path: str) -> bool:
        if path in literals:
            return True
        owner, _, leaf = path.rpartition("/")
        if preset and leaf == "kernel":
            return True
        if names and leaf in WEIGHT_NAMES and any(s in names for s in _suffixes(owner)):
            return True
        return any(r.fullmatch(path) for r in regexes)

    return match
