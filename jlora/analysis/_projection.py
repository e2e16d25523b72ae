"""How a weight relates to its update: projections onto the update's top subspaces (Table 7)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ._subspace import _matrix


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
