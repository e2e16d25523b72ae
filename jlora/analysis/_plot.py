"""A heatmap of a subspace-similarity grid, written to an image file (needs matplotlib)."""

from __future__ import annotations

import os

import numpy as np

from .. import _checks


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
