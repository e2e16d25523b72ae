"""Saving and restoring adapters with their config as one orbax checkpoint.

A checkpoint is an orbax composite checkpoint with two items: ``adapters`` (the factor arrays, and
the arrays of trainable extras, as a nested dict mirroring the parameter paths) and ``jlora`` (JSON:
the config, each adapter's layout and shapes, each extra's shape and dtype, and optionally a
fingerprint of the base; see ``_ckpt_format``). It is the layout orbax's
``CheckpointManager`` writes for ``save_args(...)``, so periodic checkpoints under a root
directory (``root/<step>/``) and single checkpoints read back the same way.

Orbax writes into a temporary directory and renames it into place once everything is on disk, so an
interrupted save leaves no directory under the final name; and ``save`` refuses an existing target
rather than deleting it first (orbax's ``force=True`` removes the old checkpoint before writing).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from . import _ckpt_format as fmt
from ._config import LoraConfig
from ._errors import AdapterMismatchError
from ._extras import Trainable
from ._factors import LoraFactors
from ._merge import adapter_tables
from ._paths import leaves_with_paths, nest

ARRAYS = "adapters"
RECORD = "jlora"

PathLike = str | os.PathLike


def _arrays_tree(table: dict[str, LoraFactors], extras: dict[str, Trainable]) -> dict[str, Any]:
    # An extra's array sits at its own path: a weight's path is never a prefix of another's.
    arrays = {path: {"a": f.a, "b": f.b} for path, f in table.items()}
    return nest({**arrays, **{path: e.value for path, e in extras.items()}})


def save_args(adapters: Any, config: LoraConfig, *, base: Any | None = None) -> ocp.args.Composite:
    """The orbax save arguments of an adapter checkpoint, for ``CheckpointManager.save``.

    With a ``CheckpointManager`` each step is written to ``root/<step>/`` in the same layout as
    :func:`save`, so :func:`restore` (which picks the latest step by default) reads it back.

    Args:
        adapters: the adapter pytree (``LoraFactors`` of concrete arrays).
        config: the config the adapters were made with.
        base: optional base parameters (arrays or ``jax.ShapeDtypeStruct``) whose paths, shapes
            and dtypes are recorded, so that :func:`restore` can refuse another base.

    Returns:
        ``ocp.args.Composite(adapters=StandardSave(...), jlora=JsonSave(...))``.

    Raises:
        AdapterMismatchError: the adapters do not match ``config`` (scale, targeted paths) or
            ``base`` (missing path, shapes).
        TypeError: ``config`` is not a :class:`jlora.LoraConfig`.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp, jlora
        >>> from jlora import checkpoint
        >>> params = {"w": jnp.ones((4, 3))}
        >>> config = jlora.LoraConfig(targets="w", rank=2)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> root = tempfile.mkdtemp()
        >>> options = ocp.CheckpointManagerOptions(max_to_keep=2)
        >>> with ocp.CheckpointManager(root, options=options) as manager:
        ...     for step in range(4):
        ...         _ = manager.save(step, args=checkpoint.save_args(adapters, config))
        >>> checkpoint.steps(root)
        [2, 3]
    """
    table, extras = fmt.check_adapters(adapters, config, base)
    return ocp.args.Composite(
        **{
            ARRAYS: ocp.args.StandardSave(_arrays_tree(table, extras)),
            RECORD: ocp.args.JsonSave(fmt.record(table, config, base, extras)),
        }
    )


def _is_checkpoint(path: epath.Path) -> bool:
    return (path / RECORD).is_dir() and (path / ARRAYS).is_dir()


def steps(directory: PathLike) -> list[int]:
    """The steps saved under ``directory`` (``directory/<step>/`` checkpoints), ascending.

    Half-written checkpoints (orbax's temporary directories) are not steps.

    Example:
        >>> import tempfile
        >>> steps(tempfile.mkdtemp())
        []
    """
    root = epath.Path(directory)
    if not root.is_dir():
        return []
    found = [int(p.name) for p in root.iterdir() if p.name.isdigit() and _is_checkpoint(p)]
    return sorted(found)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: {step!r} is invalid; expected an integer >= 0 (or None)")
    return step


def _resolve(directory: PathLike, step: int | None) -> epath.Path:
    root = epath.Path(directory)
    if step is not None:
        path = root / str(_check_step(step))
        if not _is_checkpoint(path):
            raise FileNotFoundError(
                f"{path}: no adapter checkpoint for step {step}; steps saved under {root}: "
                f"{steps(root)}"
            )
        return path
    if _is_checkpoint(root):
        return root
    found = steps(root)
    if not found:
        raise FileNotFoundError(
            f"{root}: no adapter checkpoint here, and no step directories holding one; expected a "
            "directory written by jlora.checkpoint.save (or a CheckpointManager root of them)"
        )
    return root / str(found[-1])


def save(
    directory: PathLike,
    adapters: Any,
    config: LoraConfig,
    *,
    step: int | None = None,
    base: Any | None = None,
) -> epath.Path:
    """Saves adapters, their config and (optionally) a base fingerprint as one checkpoint.

    Everything is validated before anything is written, and orbax renames a complete temporary
    directory into place, so a failed or interrupted save leaves no checkpoint under the final name
    and never touches an existing one.

    Args:
        directory: the checkpoint directory, or with ``step`` the root holding ``<step>/``.
        adapters: the adapter pytree (``LoraFactors`` of arrays, and :class:`jlora.Trainable`
            extras, saved exactly; sharded ``jax.Array`` s work).
        config: the config the adapters were made with (stored as JSON; scales derive from it).
        step: save to ``directory/<step>/`` (the layout of orbax's ``CheckpointManager``).
        base: optional base parameters; their paths, shapes and dtypes are recorded so that
            restoring onto another base fails clearly.

    Returns:
        The path of the new checkpoint.

    Raises:
        FileExistsError: the target directory exists (choose another step or remove it).
        AdapterMismatchError: the adapters do not match ``config`` or ``base``.
        TypeError: ``config`` is not a :class:`jlora.LoraConfig`.
        ValueError: ``step`` is not an integer >= 0.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jlora
        >>> from jlora import checkpoint
        >>> params = {"w": jnp.ones((4, 3))}
        >>> config = jlora.LoraConfig(targets="w", rank=2)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> root = tempfile.mkdtemp()
        >>> checkpoint.save(root, adapters, config, step=100, base=params).name
        '100'
        >>> restored, restored_config = checkpoint.restore(root)
        >>> restored_config == config, restored["w"].a.shape
        (True, (4, 2))
        >>> params["head"] = jnp.arange(3.0)
        >>> config = jlora.LoraConfig(targets="w", rank=2, trainable=("head",))
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> restored, _ = checkpoint.restore(checkpoint.save(root, adapters, config, step=101))
        >>> restored["head"].value.tolist()
        [0.0, 1.0, 2.0]
    """
    root = epath.Path(directory)
    path = root if step is None else root / str(_check_step(step))
    args = save_args(adapters, config, base=base)
    if path.exists():
        raise FileExistsError(
            f"{path}: already exists; jlora.checkpoint.save never overwrites a checkpoint. Save "
            "under a new step or directory, or remove this one first"
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=args)
    return path


def _read_record(path: epath.Path) -> dict:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            path, args=ocp.args.Composite(**{RECORD: ocp.args.JsonRestore()})
        )
    return restored[RECORD]


def _sharding_table(
    shardings: Any, paths: list[str], extras: list[str] = ()
) -> dict[str, tuple[Any, Any]]:
    if shardings is None:
        return {}
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys([*paths, *extras], (shardings, shardings))
    flat = dict(leaves_with_paths(shardings))
    for path, leaf in flat.items():
        if not isinstance(leaf, jax.sharding.Sharding):
            raise TypeError(
                f"shardings: {path} holds a {type(leaf).__name__}; expected a jax.sharding.Sharding"
            )
    table, used = {}, set()
    for path in paths:
        if path in flat:
            table[path] = (flat[path], flat[path])
            used.add(path)
        elif f"{path}/a" in flat and f"{path}/b" in flat:
            table[path] = (flat[f"{path}/a"], flat[f"{path}/b"])
            used.update((f"{path}/a", f"{path}/b"))
        else:
            raise AdapterMismatchError(
                f"{path}: shardings has no entry for this adapter; expected a sharding at {path} "
                f"(both factors) or at {path}/a and {path}/b, for every adapter in the checkpoint"
            )
    for path in extras:
        key = path if path in flat else f"{path}/value"
        if key not in flat:
            raise AdapterMismatchError(
                f"{path}: shardings has no entry for this trainable extra; expected a sharding at "
                f"{path} (or a jlora.Trainable holding one), for every extra in the checkpoint"
            )
        table[path] = (flat[key], flat[key])
        used.add(key)
    extra = [p for p in flat if p not in used]
    if extra:
        raise AdapterMismatchError(
            f"{extra[0]}: shardings has an entry here but the checkpoint has no adapter at this "
            f"path ({len(extra)} such entries); were the shardings made for other adapters?"
        )
    return table


def _check_target(
    target: Any,
    records: dict[str, fmt.AdapterRecord],
    extra_records: dict[str, fmt.ExtraRecord],
    config: LoraConfig,
) -> dict:
    table, extras = adapter_tables(target)
    for path in [*extra_records, *extras]:
        if (path in extra_records) != (path in extras):
            where = "the target but not the checkpoint" if path in extras else "the checkpoint only"
            raise AdapterMismatchError(
                f"{path}: a trainable extra at this path is in {where}. Was the target made with "
                "another config? Build it with jax.eval_shape(jlora.init, key, params, config) "
                "using the saved config"
            )
        found = tuple(extras[path].value.shape)
        if found != extra_records[path].shape:
            raise AdapterMismatchError(
                f"{path}: the target's trainable extra has shape {found} but the checkpoint holds "
                f"{extra_records[path].shape}; make the target from the base the adapters were "
                "saved for"
            )
    differing = [p for p in [*records, *table] if (p in records) != (p in table)]
    if differing:
        path = differing[0]
        where = "the target but not the checkpoint" if path in table else "the checkpoint only"
        raise AdapterMismatchError(
            f"{path}: an adapter at this path is in {where} ({len(differing)} differing paths). "
            "Was the target made with another config? Build it with jax.eval_shape(jlora.init, "
            "key, params, config) using the saved config"
        )
    for path, f in table.items():
        r = records[path]
        found = (tuple(f.a.shape), tuple(f.b.shape), f.layout)
        if found != (r.a_shape, r.b_shape, r.layout):
            raise AdapterMismatchError(
                f"{path}: the target has a {found[0]}, b {found[1]}, {found[2]} but the checkpoint "
                f"holds a {r.a_shape}, b {r.b_shape}, {r.layout}; make the target with the saved "
                "config (its ranks and layouts)"
            )
        if abs(f.scale - config.scale_for(path)) > 1e-9 * abs(f.scale):
            raise AdapterMismatchError(
                f"{path}: the target has scale {f.scale} but the saved config gives "
                f"{config.scale_for(path)}; make the target with the saved config"
            )
    return {**table, **extras}


def restore(
    directory: PathLike,
    *,
    step: int | None = None,
    target: Any | None = None,
    shardings: Any | None = None,
    base: Any | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """Restores adapters and their config from a checkpoint written by :func:`save`.

    The adapter tree is rebuilt from the saved structure (``scale`` from the saved config, layouts
    from the saved record, trainable extras as :class:`jlora.Trainable` with their saved values
    and dtypes, bit for bit), or checked against ``target`` when one is given. Arrays land on the
    shardings asked for: ``shardings``, else the target leaves' ``.sharding``, else the first local
    device.

    Args:
        directory: a checkpoint, or a root of ``<step>/`` checkpoints (the latest is read).
        step: read ``directory/<step>/``.
        target: an abstract adapter tree (``jax.eval_shape(jlora.init, key, params, config)``);
            its dtypes are used (a cast on restore) and its structure must match the checkpoint.
        shardings: a ``jax.sharding.Sharding`` for every factor, or a tree with one sharding per
            adapter path, or one per factor (``{path: {"a": ..., "b": ...}}``, or ``LoraFactors``
            nodes holding shardings, as :func:`jlora.sharding.factor_shardings` returns), and one
            per trainable extra (at its path, or in a ``jlora.Trainable``).
        base: base parameters (arrays or ``jax.ShapeDtypeStruct``) to check the adapters against:
            the saved fingerprint (if any) must match, and every adapter must fit its weight.

    Returns:
        ``(adapters, config)``.

    Raises:
        FileNotFoundError: no checkpoint at ``directory`` (or for ``step``).
        AdapterMismatchError: ``base`` differs from the saved fingerprint (the message names the
            first differing path), or ``target``/``shardings`` do not match the checkpoint.
        ValueError: the directory is not a jlora adapter checkpoint, or of a newer format.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, numpy as np, jlora
        >>> from jlora import checkpoint
        >>> params = {"w": jnp.ones((8, 8))}
        >>> config = jlora.LoraConfig(targets="w", rank=2)
        >>> adapters = jlora.init(jax.random.key(0), params, config)
        >>> path = checkpoint.save(tempfile.mkdtemp() + "/adapter", adapters, config)
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))
        >>> on_x = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        >>> replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        >>> restored, _ = checkpoint.restore(path, shardings={"w": {"a": on_x, "b": replicated}})
        >>> restored["w"].a.sharding == on_x, restored["w"].b.sharding == replicated
        (True, True)
    """
    path = _resolve(directory, step)
    config, records, extra_records, saved_base = fmt.parse(_read_record(path), str(path))
    if base is not None and saved_base is not None:
        fmt.check_fingerprint(saved_base, base)
    wanted = _check_target(target, records, extra_records, config) if target is not None else {}
    placement = _sharding_table(shardings, list(records), list(extra_records))
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(path: str, name: str, shape: tuple[int, ...], dtype: str) -> Any:
        leaf = getattr(wanted[path], name) if path in wanted else None
        sharding = placement.get(path, (None, None))[name == "b"]
        if sharding is None:
            sharding = getattr(leaf, "sharding", None) or default
        dtype = leaf.dtype if leaf is not None else dtype
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    item = nest(
        {
            **{
                p: {
                    "a": abstract(p, "a", r.a_shape, r.a_dtype),
                    "b": abstract(p, "b", r.b_shape, r.b_dtype),
                }
                for p, r in records.items()
            },
            **{p: abstract(p, "value", r.shape, r.dtype) for p, r in extra_records.items()},
        }
    )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        arrays = checkpointer.restore(
            path, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(item)})
        )[ARRAYS]
    flat = dict(leaves_with_paths(arrays))
    table = {
        p: LoraFactors(flat[f"{p}/a"], flat[f"{p}/b"], config.scale_for(p), r.layout)
        for p, r in records.items()
    }
    extras = {p: Trainable(flat[p]) for p in extra_records}
    if base is not None:
        fmt.check_base_fit(table, base, extras)
    return nest({**table, **extras}), config
