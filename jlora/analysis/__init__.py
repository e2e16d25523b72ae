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

from .._errors import DegenerateBasisWarning as DegenerateBasisWarning
from ._counts import adapter_tuning_param_count as adapter_tuning_param_count
from ._counts import lora_param_count as lora_param_count
from ._plot import plot_subspace_similarity as plot_subspace_similarity
from ._projection import UpdateProjection as UpdateProjection
from ._projection import update_projection as update_projection
from ._subspace import grassmann_distance as grassmann_distance
from ._subspace import singular_basis as singular_basis
from ._subspace import subspace_similarity as subspace_similarity
from ._subspace import subspace_similarity_grid as subspace_similarity_grid

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

