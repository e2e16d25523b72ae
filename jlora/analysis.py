"""The LoRA paper's diagnostics (Hu et al. 2022, section 7) over jlora's factors.

Orientation. The paper writes ``delta W = B A`` with ``A: (r, k)`` reading the input and
``B: (d, r)`` writing the output. jlora stores Flax-style ``a: (fan_in, r)`` and ``b: (r, fan_out)``,
so ``a = A^T`` and ``b = B^T``. The paper's right-singular vectors of ``A`` (directions of the input
space) are therefore the *left* singular vectors of ``a``, and the left-singular vectors of ``B``
(directions of the output space) are the *right* singular vectors of ``b``.
:func:`singular_basis` returns either, as orthonormal columns ordered by singular value.

* Subspace similarity: for orthonormal bases ``U1 (n, i)`` and ``U2 (n, j)``,
  ``phi = ||U1^T U2||_F^2 / min(i, j)``, in ``[0, 1]``: 1 when one span contains the other.
* Grassmann distance: ``sqrt(sum_k theta_k^2)`` over the principal angles ``theta_k`` between the
  spans (``cos theta_k`` are the singular values of ``U1^T U2``). Small angles are read from their
  sines, so identical spans are 0 apart to float64 round-off (``arccos`` alone gives ~1e-8).

Both need *orthonormal* bases and refuse others (``max |U^T U - I| > 1e-4``) rather than
orthonormalising them: ``phi`` of a non-orthonormal matrix is not bounded by 1 (``ones((4, 1))``
with itself would give 16), and the grid's "top-``i``" columns mean singular directions, which a
silent QR of, say, a raw factor ``a`` would not give. Pass :func:`singular_basis`'s output, or
``np.linalg.qr(x)[0]`` where the spans of the leading columns are what you mean.
:func:`singular_basis` warns (:class:`DegenerateBasisWarning`) when a direction it returns has
singular value 0, as every output-side direction of an untrained adapter (``b = 0``) does: such
directions are arbitrary, and any ``phi`` computed from them is noise.

* Weight/update relation: with ``U, V`` the top-``r`` singular directions of ``delta W``,
  ``||U^T W V||_F`` measures how much of ``W`` lies in the update's subspace; the amplification
  factor is ``||delta W||_F / ||U^T W V||_F``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Literal

import jax
import numpy as np

from . import _checks
from ._errors import AdapterMismatchError, DegenerateBasisWarning
from ._factors import LoraFactors

__all__ = [
    "DegenerateBasisWarning",
    "UpdateProjection",
    "adapter_tuning_param_count",
    "grassmann_distance",
    "lora_param_count",
    "plot_subspace_similarity",
    "singular_basis",
    "subspace_similarity",
    "subspace_similarity_grid",
    "update_projection",
]


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


@dataclasses.dataclass(frozen=True)
class UpdateProjection:
    """How a weight relates to its update (the paper's Table 7 quantities, Frobenius norms).

    Attributes:
        rank: number of directions ``r`` projected onto.
        delta_norm: ``||delta W||``.
        weight_norm: ``||W||``.
        onto_delta: ``||U^T W V||`` with ``U, V`` the top-``r`` singular directions of delta W.
        onto_weight: the same with the top-``r`` directions of ``W`` itself.
        onto_random: the same with one random ``r``-dimensional pair of subspaces (a single
            seeded draw; for a chance level use its closed form: independent uniform subspaces
            give ``E ||U^T W V||^2 = r^2 ||W||^2 / (d k)`` for ``W: (d, k)``).
    """

    rank: int
    delta_norm: float
    weight_norm: float
    onto_delta: float
    onto_weight: float
    onto_random: float

    @property
    def amplification(self) -> float:
        """``||delta W|| / ||U^T W V||``: how much the update amplifies directions of ``W``."""
        return self.delta_norm / self.onto_delta


def _top(x: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u[:, :r], vh[:r].T


def _projected_norm(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    return float(np.linalg.norm(u.T @ w @ v))


def update_projection(
    weight: jax.Array | np.ndarray, delta: jax.Array | np.ndarray, *, rank: int, seed: int = 0
) -> UpdateProjection:
    """Projects ``W`` onto the top-``rank`` subspaces of ``delta W``, of ``W``, and of a random pair.

    Args:
        weight: the (pre-trained) weight, 2-D (flatten multi-axis layouts first).
        delta: its update ``delta W`` (e.g. from :func:`jlora.delta`), same shape.
        rank: the number of singular directions ``r``.
        seed: seed of the random subspaces.

    Returns:
        An :class:`UpdateProjection`; ``.amplification`` is the paper's factor.

    Example:
        >>> import numpy as np
        >>> w = np.diag([5.0, 1.0, 0.1])
        >>> p = update_projection(w, np.diag([0.0, 0.0, 2.0]), rank=1)
        >>> round(p.onto_delta, 6), round(p.amplification, 6), round(p.onto_weight, 6)
        (0.1, 20.0, 5.0)
    """
    w, d = _matrix("weight", weight), _matrix("delta", delta)
    if w.shape != d.shape:
        raise ValueError(f"update_projection: weight {w.shape} and delta {d.shape} differ in shape")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"update_projection: rank={rank} is outside [1, {min(w.shape)}]")
    rng = np.random.default_rng(seed)
    random_u, _ = np.linalg.qr(rng.normal(size=(w.shape[0], rank)))
    random_v, _ = np.linalg.qr(rng.normal(size=(w.shape[1], rank)))
    return UpdateProjection(
        rank=rank,
        delta_norm=float(np.linalg.norm(d)),
        weight_norm=float(np.linalg.norm(w)),
        onto_delta=_projected_norm(w, *_top(d, rank)),
        onto_weight=_projected_norm(w, *_top(w, rank)),
        onto_random=_projected_norm(w, random_u, random_v),
    )


def lora_param_count(num_matrices: int, d_model: int, rank: int) -> int:
    """The paper's LoRA count ``|Theta| = 2 * L_lora * d_model * r`` (square ``d_model`` weights).

    Example:
        >>> lora_param_count(num_matrices=2 * 96, d_model=12288, rank=4)  # GPT-3, q and v, r = 4
        18874368
    """
    num_matrices = _checks.count(num_matrices, "num_matrices")
    d_model = _checks.count(d_model, "d_model", 1)
    rank = _checks.count(rank, "rank", 1)
    return 2 * num_matrices * d_model * rank


def adapter_tuning_param_count(
    num_adapters: int, d_model: int, rank: int, num_layer_norms: int
) -> int:
    """Adapter tuning's count ``L_adpt (2 d_model r + r + d_model) + 2 L_LN d_model`` (the paper's).

    Example:
        >>> adapter_tuning_param_count(num_adapters=24, d_model=1024, rank=8, num_layer_norms=48)
        516288
    """
    num_adapters = _checks.count(num_adapters, "num_adapters")
    d_model = _checks.count(d_model, "d_model", 1)
    rank = _checks.count(rank, "rank", 1)
    num_layer_norms = _checks.count(num_layer_norms, "num_layer_norms")
    return num_adapters * (2 * d_model * rank + rank + d_model) + 2 * num_layer_norms * d_model


def plot_subspace_similarity(
    grid: np.ndarray, path: str, *, title: str = "", xlabel: str = "j", ylabel: str = "i"
) -> str:
    """Writes a heatmap of a :func:`subspace_similarity_grid` to ``path`` (PNG, PDF, ...).

    Needs matplotlib (``pip install jlora[examples]``).

    Returns:
        ``path``.

    Example:
        >>> import numpy as np, os, tempfile
        >>> out = plot_subspace_similarity(np.eye(4), os.path.join(tempfile.mkdtemp(), "phi.png"))
        >>> os.path.getsize(out) > 0
        True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_subspace_similarity needs matplotlib: pip install matplotlib"
        ) from e
    grid = np.asarray(grid)
    if grid.ndim != 2:
        raise ValueError(
            f"grid: expected a 2-D array (subspace_similarity_grid's output), found shape "
            f"{grid.shape}"
        )
    path = _checks.path(path, "path")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise FileNotFoundError(
            f"path {path}: "
            + (
                "is a directory"
                if os.path.isdir(path)
                else f"its directory {folder} does not exist"
            )
            + "; expected a file name in an existing directory, e.g. 'figures/phi.png'"
        )
    rows, cols = grid.shape
    # Cells shrink past ~30 per side, so a 64 x 64 grid stays a readable 9 x 7 inch figure.
    fig, ax = plt.subplots(figsize=(min(2.0 + 0.25 * cols, 9.0), min(1.4 + 0.25 * rows, 7.0)))
    try:
        image = ax.imshow(
            grid,
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            origin="upper",
            aspect="auto",
            interpolation="nearest",
            extent=(0.5, cols + 0.5, rows + 0.5, 0.5),
        )
        fig.colorbar(image, ax=ax, label="phi")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
