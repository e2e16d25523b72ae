"""Adapter checkpoints with orbax, and merging adapters into base checkpoints on disk.

**Adapter checkpoints.** :func:`save` writes the factors, the :class:`jlora.LoraConfig` (JSON), each
adapter's layout and, when given the base, a fingerprint of it (paths, shapes, dtypes) as one orbax
checkpoint; :func:`restore` rebuilds the ``LoraFactors`` tree from it, onto shardings when asked,
and refuses a base the adapters were not made for. Saves are atomic: orbax writes a temporary
directory and renames it into place, and jlora never overwrites a checkpoint.

Periodic saving that keeps the last ``N`` is orbax's ``CheckpointManager`` with :func:`save_args`::

    options = ocp.CheckpointManagerOptions(max_to_keep=3, save_interval_steps=100)
    with ocp.CheckpointManager(root, options=options) as manager:
        for step in range(num_steps):
            adapters, opt_state = train_step(adapters, opt_state, batch)
            manager.save(step, args=jlora.checkpoint.save_args(adapters, config))
    adapters, config = jlora.checkpoint.restore(root)          # the latest step

**Merging on disk.** :func:`merge_checkpoint` folds an adapter checkpoint into a base checkpoint
(an orbax PyTree checkpoint of the parameters) and writes a new one, a group of leaves at a time,
so host memory stays near the largest leaf rather than the model. The command line does the same:
``python -m jlora merge --base DIR --adapter DIR --out DIR [--overwrite]``. A merge killed at
any moment is repaired by the next merge into the same output, or by :func:`recover_merge`
(``python -m jlora recover --out DIR``).
"""

from ._adapters import save as save
from ._adapters import save_args as save_args
from ._disk_merge import MergeSummary as MergeSummary
from ._disk_merge import merge_checkpoint as merge_checkpoint
from ._disk_merge import recover_merge as recover_merge
from ._restore import restore as restore
from ._steps import steps as steps

__all__ = [
    "MergeSummary",
    "merge_checkpoint",
    "recover_merge",
    "restore",
    "save",
    "save_args",
    "steps",
]
