"""Checks of the plain values public functions take: paths, PRNG keys, flags, counts, callables.

Each raises a ``TypeError``/``ValueError`` whose message names the parameter, what was found, what
was expected and an example of the fix, where the value would otherwise fail deep inside
``os``, jax or optax with a message that names none of them (or be taken silently, as a truthy
string is for a flag).
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import jax
import numpy as np


def found(value: Any) -> str:
    if value is None:
        return "None"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"the {type(value).__name__} {getattr(value, '__module__', '')}.{value.__qualname__}"
    return f"a {type(value).__name__} ({value!r:.60})"


def path(value: Any, name: str) -> str:
    """``value`` as a ``str`` path; raises ``TypeError`` unless it is a ``str`` or ``os.PathLike``."""
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str) and text:
            return text
    raise TypeError(
        f"{name}: got {found(value)}; expected a directory path (a non-empty str or "
        "os.PathLike, e.g. '/tmp/run/adapters' or pathlib.Path('adapters'))"
    )


def not_a_file(directory: str, name: str, *, itself: bool = True) -> None:
    """Raises ``NotADirectoryError`` if ``directory`` (unless not ``itself``) or one of its
    ancestors is a file."""
    if "://" in directory:
        return
    node = os.path.abspath(directory)
    if not itself:
        node = os.path.dirname(node)
    while True:
        if os.path.lexists(node) and not os.path.isdir(node):
            where = "is" if node == os.path.abspath(directory) else f"lies under {node}, which is"
            raise NotADirectoryError(
                f"{name} {directory}: {where} a file, not a directory; expected a directory "
                "path. Choose another directory, or move the file away"
            )
        parent = os.path.dirname(node)
        if parent == node:
            return
        node = parent


def flag(value: Any, name: str) -> bool:
    """``value`` as a ``bool``; raises ``TypeError`` for anything but ``bool``/``np.bool_``."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(f"{name}: got {found(value)}; expected True or False")


def step(value: Any, name: str = "step") -> int:
    """``value`` as an ``int`` >= 0 (Python or NumPy integers; not bools)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_):
        if int(value) >= 0:
            return int(value)
    raise ValueError(f"{name}: {value!r} is invalid; expected an integer >= 0 (or None)")


def count(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as an ``int`` >= ``minimum`` (Python or NumPy integers; not bools)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_):
        if int(value) >= minimum:
            return int(value)
    raise ValueError(f"{name}: {value!r} is invalid; expected an integer >= {minimum}")


def function(value: Any, name: str, example: str) -> None:
    """Raises ``TypeError`` unless ``value`` is callable."""
    if not callable(value):
        raise TypeError(f"{name}: got {found(value)}; expected a function, e.g. {example}")


def adapters_given(adapters: Any, name: str = "adapters") -> None:
    """Raises ``AdapterMismatchError`` if ``adapters`` is None (an empty tree, not adapters)."""
    if adapters is None:
        from ._errors import AdapterMismatchError

        raise AdapterMismatchError(
            f"{name}: got None; expected the adapter tree from jlora.init (or a restored "
            "checkpoint). None is an empty tree: it would adapt nothing without a word"
        )


def prng_key(value: Any, name: str) -> None:
    """Raises ``TypeError`` unless ``value`` is a PRNG key: typed (``jax.random.key``) or raw
    ``uint32`` key data (``jax.random.PRNGKey``); traced keys pass."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and hasattr(value, "shape"):
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return
        if dtype == np.uint32 and np.ndim(value) >= 1:
            return
    raise TypeError(
        f"{name}: got {found(value)}; expected a PRNG key, e.g. jax.random.key(0) (or the "
        "uint32 key data of jax.random.PRNGKey(0))"
    )
