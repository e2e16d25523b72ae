"""Orthonormal bases of an adapter's factors and how far apart two spans are (``phi``, Grassmann).

The maths and the orientation (``a = A^T``, ``b = B^T``) are stated in :mod:`jlora.analysis`.
"""

from __future__ import annotations

import warnings
from typing import Literal

import jax
import numpy as np

from .. import _checks
from .._errors import AdapterMismatchError, DegenerateBasisWarning
from .._factors import LoraFactors


def _matrix(name: str, x: jax.Array | np.ndarray) -> np.ndarray:
    try:
        x = np.asarray(x, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: got {_checks.found(x)}; expected a 2-D real array") from None
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, found shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(
            f"{name}: holds {int(np.size(x) - np.isfinite(x).sum())} NaN or infinite values; "
            "expected a finite basis (are the adapters finite?)"
        )
    return x


def singular_basis(
    factors: LoraFactors, side: Literal["input", "output"] = "input", k: int | None = None
) -> np.ndarray:
    """The top-``k`` singular directions of one adapter, as orthonormal columns (float64).

    Args:
        factors: one layer's factors (slice stacked ones first); multi-axis fan-in or fan-out
            axes are flattened.
        side: ``"input"``: left singular vectors of ``a`` (the paper's right-singular vectors of
            ``A``), shape ``(fan_in, k)``; ``"output"``: right singular vectors of ``b`` (the
            paper's left-singular vectors of ``B``), shape ``(fan_out, k)``.
        k: how many directions; default the rank.

    Returns:
        ``(n, k)`` with orthonormal columns, ordered by decreasing singular value.

    Raises:
        ValueError: ``side`` is unknown or ``k`` is outside ``[1, rank]``.
        AdapterMismatchError: the factors have stack axes.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> a = jnp.array([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
        >>> f = jlora.LoraFactors(a, jnp.ones((2, 5)), 1.0, jlora.Layout(1, 1))
        >>> abs(singular_basis(f, "input", k=1)).round(3).ravel().tolist()
        [0.0, 1.0, 0.0, 0.0]
    """
    if not isinstance(factors, LoraFactors):
        raise TypeError(
            f"singular_basis: factors is {_checks.found(factors)}; expected one layer's "
            "jlora.LoraFactors"
        )
    rank = factors.rank
    if factors.a.ndim != factors.layout.fan_in_ndim + 1:
        raise AdapterMismatchError(
            f"singular_basis: factors a {factors.a.shape} have stack axes; pass one layer's slice, "
            "e.g. jax.tree.map(lambda t: t[layer], factors)"
        )
    k = rank if k is None else k
    if not 1 <= k <= rank:
        raise ValueError(f"singular_basis: k={k} is outside [1, rank={rank}]")
    if side == "input":
        u, sigma, _ = np.linalg.svd(
            np.asarray(factors.a, np.float64).reshape(-1, rank), full_matrices=False
        )
        basis, factor = u[:, :k], "a"
    elif side == "output":
        _, sigma, vh = np.linalg.svd(
            np.asarray(factors.b, np.float64).reshape(rank, -1), full_matrices=False
        )
        basis, factor = vh[:k].T, "b"
    else:
        raise ValueError(f"singular_basis: side={side!r}; expected 'input' or 'output'")
    # Singular values at round-off level have arbitrary directions (b = 0 at init: all of them).
    zero = sigma[:k] <= max(sigma.max(initial=0.0), np.finfo(np.float32).tiny) * 1e-7
    if zero.any():
        untrained = " (b = 0: an untrained adapter?)" if factor == "b" and not sigma.any() else ""
        warnings.warn(
            f"singular_basis: {int(zero.sum())} of the {k} {side}-side directions asked for have "
            f"singular value 0 in {factor}{untrained}, so they are arbitrary and any phi or "
            "distance computed from them is noise; train the adapter first or ask for fewer "
            "directions (k)",
            DegenerateBasisWarning,
            stacklevel=2,
        )
    return basis


ORTHONORMAL_TOLERANCE = 1e-4
"""Largest ``|U^T U - I|`` entry accepted as orthonormal (float32 SVDs land near 1e-6)."""


def _orthonormal(name: str, u: jax.Array | np.ndarray) -> np.ndarray:
    u = _matrix(name, u)
    error = float(np.abs(u.T @ u - np.eye(u.shape[1])).max(initial=0.0))
    if error > ORTHONORMAL_TOLERANCE:
        raise ValueError(
            f"{name}: the {u.shape[1]} columns of this {u.shape} array are not orthonormal "
            f"(max |U^T U - I| = {error:.3g}, expected <= {ORTHONORMAL_TOLERANCE:g}); phi and the "
            "Grassmann distance are defined on orthonormal bases: pass "
            "jlora.analysis.singular_basis(factors, side), or np.linalg.qr(x)[0] for the spans "
            "of x's leading columns"
        )
    return u


def _bases(u1: jax.Array | np.ndarray, u2: jax.Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u1, u2 = _orthonormal("u1", u1), _orthonormal("u2", u2)
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(
            f"bases live in different spaces: u1 has {u1.shape[0]} rows, u2 {u2.shape[0]}; compare "
            "adapters of the same weight, on the same side"
        )
    return u1, u2


def _overlap(u1: jax.Array | np.ndarray, u2: jax.Array | np.ndarray) -> np.ndarray:
    u1, u2 = _bases(u1, u2)
    return u1.T @ u2


def subspace_similarity(u1: jax.Array | np.ndarray, u2: jax.Array | np.ndarray) -> float:
    """The paper's ``phi = ||U1^T U2||_F^2 / min(i, j)`` for orthonormal bases ``(n, i)``, ``(n, j)``.

    Raises:
        ValueError: a basis is not orthonormal (``phi`` would not be bounded by 1), or the two
            live in spaces of different size.

    Example:
        >>> import numpy as np
        >>> e = np.eye(4)
        >>> subspace_similarity(e[:, :2], e[:, :3]), subspace_similarity(e[:, :2], e[:, 2:])
        (1.0, 0.0)
    """
    m = _overlap(u1, u2)
    return float(np.sum(m**2) / min(m.shape))


def subspace_similarity_grid(u1: jax.Array | np.ndarray, u2: jax.Array | np.ndarray) -> np.ndarray:
    """``phi`` between the top-``i`` columns of ``u1`` and the top-``j`` of ``u2``, for all ``i, j``.

    Returns:
        ``grid[i - 1, j - 1] = phi(u1[:, :i], u2[:, :j])``, shape ``(i_max, j_max)``.

    Example:
        >>> import numpy as np
        >>> subspace_similarity_grid(np.eye(3), np.eye(3)[:, ::-1]).round(2).tolist()
        [[0.0, 0.0, 1.0], [0.0, 0.5, 1.0], [1.0, 1.0, 1.0]]
    """
    m2 = _overlap(u1, u2) ** 2
    cumulative = m2.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, m2.shape[0] + 1)[:, None]
    j = np.arange(1, m2.shape[1] + 1)[None, :]
    return cumulative / np.minimum(i, j)


def grassmann_distance(u1: jax.Array | np.ndarray, u2: jax.Array | np.ndarray) -> float:
    """Geodesic distance between the spans of two orthonormal bases: ``sqrt(sum theta_k^2)``.

    With bases of different sizes the ``min(i, j)`` principal angles are used. Angles below
    ``pi / 4`` come from their sines (the singular values of ``U_small - U_big U_big^T U_small``),
    the rest from their cosines, as in ``scipy.linalg.subspace_angles``: accurate to round-off at
    both ends.

    Raises:
        ValueError: a basis is not orthonormal, or the two live in spaces of different size.

    Example:
        >>> import numpy as np
        >>> e = np.eye(3)
        >>> round(grassmann_distance(e[:, :1], e[:, 1:2]), 6) == round(np.pi / 2, 6)
        True
        >>> grassmann_distance(e[:, :2], e[:, 1::-1])
        0.0
    """
    u1, u2 = _bases(u1, u2)
    small, big = (u1, u2) if u1.shape[1] <= u2.shape[1] else (u2, u1)
    cosines = np.linalg.svd(big.T @ small, compute_uv=False)  # descending
    sines = np.linalg.svd(small - big @ (big.T @ small), compute_uv=False)[::-1]  # ascending
    angles = np.where(
        cosines**2 < 0.5, np.arccos(np.clip(cosines, 0.0, 1.0)), np.arcsin(np.clip(sines, 0, 1))
    )
    return float(np.sqrt(np.sum(angles**2)))
