"""Restoring adapter checkpoints: the record, orbax's metadata and every array checked first.

:func:`restore` reads the JSON record (validated by ``_parse.parse``), compares it with
orbax's own metadata of the arrays, checks the base against the saved fingerprint and content
digests, reads the arrays in their saved dtypes onto the shardings asked for, verifies each
against its SHA-256 digest and (by default) for NaN/Inf, and only then casts to a target's dtypes
and rebuilds the ``LoraFactors`` tree. Any orbax or tensorstore failure on the way is reported as
one :class:`DamagedCheckpointError` naming the checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from .. import _checks, _dirs
from .._config import LoraConfig
from .._errors import AdapterMismatchError
from .._extras import Trainable
from .._factors import LoraFactors, with_boxes
from .._merge import adapter_tables
from .._paths import is_box, leaves_with_paths, nest, path_to_str
from . import _base
from . import _format as fmt
from . import _magnitudes as mag
from . import _parse
from ._steps import ARRAYS, PathLike, first_line, read_record, resolve
from ._array_checks import _check_array_metadata, _unreadable, _verify


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
                f"shardings{f' at {path}' if path else ''}: got a {type(leaf).__name__}; expected "
                "a jax.sharding.Sharding (or a tree of them mirroring the adapters)"
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
    base_digest: bool = True,
    check_finite: bool = True,
    magnitudes: bool = False,
) -> tuple[dict[str, Any], LoraConfig] | tuple[dict[str, Any], LoraConfig, dict[str, Any]]:
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
        base_digest: with ``base`` holding values, also compare them with the content digests
            saved with the checkpoint (one pass over the base; False checks shapes only).
        check_finite: refuse factors or extras holding NaN or infinite values (adapters are
            small, so this is cheap).
        magnitudes: also return the DoRA magnitudes saved with ``save(..., magnitudes=)``, each
            on its ``b``'s mesh with ``b``'s spec less the rank axis. Required for such a
            checkpoint: its factors alone would be restored as plain LoRA.

    Returns:
        ``(adapters, config)``, and with ``magnitudes=True`` ``(adapters, config, magnitudes)``
        (``{path: m}`` as saved, empty if none were).

        Factors come back in the metadata boxes of ``target``'s factors
        (``nn.LogicallyPartitioned``, ...), or, without a target, in the boxes :func:`jlora.init`
        gives the factors of ``base``'s boxed weights, so that ``nn.get_partition_spec`` and a
        step traced with boxed adapters accept them.

    Every array is checked against the SHA-256 digest recorded when it was saved (checkpoints
    written before jlora recorded digests restore unverified).

    Raises:
        FileNotFoundError: no checkpoint at ``directory`` (or for ``step``).
        AdapterMismatchError: ``base`` differs from the saved fingerprint or content digests (the
            message names the first differing path), or ``target``/``shardings`` do not match the
            checkpoint; the checkpoint holds DoRA magnitudes and ``magnitudes`` is False.
        DamagedCheckpointError: a file of the checkpoint is missing, truncated or corrupt, or an
            array differs from its recorded digest (a ``ValueError``).
        NonFiniteError: a factor or extra holds NaN or Inf values (``check_finite``).
        ValueError: the directory is not a jlora adapter checkpoint, or of a newer format.
        TypeError: ``directory`` is not a path, or a flag is not a bool.

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
    path = resolve(_dirs.absolute(_checks.path(directory, "directory")), step)
    _checks.flag(base_digest, "base_digest")
    _checks.flag(check_finite, "check_finite")
    _checks.flag(magnitudes, "magnitudes")
    rec = _parse.parse(read_record(path), str(path))
    if rec.magnitudes and not magnitudes:
        mag.refuse_unasked(str(path), list(rec.magnitudes))
    config, records, extra_records = rec.config, rec.adapters, rec.extras
    if base is not None and rec.base is not None:
        _base.check_fingerprint(rec.base, base)
        if base_digest:
            _base.check_digests(rec.base_digests, base)
    wanted = _check_target(target, records, extra_records, config) if target is not None else {}
    placement = _sharding_table(shardings, list(records), list(extra_records))
    default = _single_device_sharding(jax.local_devices()[0])

    def abstract(path: str, name: str, shape: tuple[int, ...], dtype: str) -> Any:
        # Read in the saved dtype (the digest is of those bytes); a target's dtype is a cast after.
        leaf = getattr(wanted[path], name) if path in wanted else None
        sharding = placement.get(path, (None, None))[name == "b"]
        if sharding is None:
            sharding = getattr(leaf, "sharding", None) or default
        if isinstance(sharding, jax.sharding.NamedSharding):
            from ..sharding import check_divides

            check_divides(f"{path}/{name}", shape, sharding.spec, sharding.mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def factors_item(p: str, r: fmt.AdapterRecord) -> dict[str, Any]:
        a, b = abstract(p, "a", r.a_shape, r.a_dtype), abstract(p, "b", r.b_shape, r.b_dtype)
        out = {"a": a, "b": b}
        if p in rec.magnitudes:  # DoRA's magnitude: on b's mesh, b's spec less the rank axis
            m, n_stack = rec.magnitudes[p], len(r.a_shape) - 1 - r.layout.fan_in_ndim
            sharding = mag.sharding_of(out["b"].sharding, n_stack)
            out["m"] = jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
        return out

    item = nest(
        {
            **{p: factors_item(p, r) for p, r in records.items()},
            **{p: abstract(p, "value", r.shape, r.dtype) for p, r in extra_records.items()},
        }
    )
    _check_array_metadata(path, records, extra_records, rec.magnitudes)
    failure = None
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            arrays = checkpointer.restore(
                path, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(item)})
            )[ARRAYS]
    except Exception as e:
        failure = f"{type(e).__name__}: {first_line(e)}"
    if failure is not None:  # raised here, so orbax's traceback (and its frames) are freed now
        raise _unreadable(path, failure)
    flat = dict(leaves_with_paths(arrays))
    _verify(path, flat, records, extra_records, rec.digests, check_finite, rec.magnitudes)

    def cast(p: str, name: str, key: str) -> Any:
        x = flat[key]
        leaf = getattr(wanted[p], name) if p in wanted else None
        return x if leaf is None or leaf.dtype == x.dtype else x.astype(leaf.dtype)

    table = {
        p: LoraFactors(
            cast(p, "a", f"{p}/a"), cast(p, "b", f"{p}/b"), config.scale_for(p), r.layout
        )
        for p, r in records.items()
    }
    extras = {p: Trainable(cast(p, "value", p)) for p in extra_records}
    if base is not None:
        fmt.check_base_fit(table, base, extras)
    adapters = _boxed(nest({**table, **extras}), target, base, table)
    if magnitudes:
        return adapters, config, nest({p: flat[f"{p}/m"] for p in rec.magnitudes})
    return adapters, config


def _boxed(adapters: Any, target: Any, base: Any, table: dict[str, LoraFactors]) -> Any:
    """``adapters`` with each factor in the metadata box (``nn.LogicallyPartitioned``, ...) of
    ``target``'s factor at its path, or, without a target, in the box ``init`` gives the factors
    of ``base``'s boxed weights; so a restored tree has the structure the user's jitted step and
    optimizer state were traced with."""
    if target is None and base is None:
        return adapters
    like = target if target is not None else with_boxes(nest(table), base)
    found, _ = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_box)
    boxes = {path_to_str(p): x for p, x in found if is_box(x)}
    if not boxes:
        return adapters
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    leaves = [boxes[k].replace_boxed(x) if (k := path_to_str(p)) in boxes else x for p, x in flat]
    return treedef.unflatten(leaves)


def _single_device_sharding(device: jax.Device) -> jax.sharding.Sharding:
    """The sharding that puts an array on ``device``; jax 0.12.1 deprecates the class's name."""
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    if make is not None:
        return make(device)
    return jax.sharding.SingleDeviceSharding(device)
