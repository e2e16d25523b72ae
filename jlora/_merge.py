"""`merge`, `unmerge` and `delta`: pure tree-maps between a base pytree and its adapters.

``merge`` returns ``W0 + scale * a @ b`` at every adapted weight and ``unmerge`` its inverse. The sum is
formed in float32 and rounded once to the base dtype, so a merged bfloat16 weight is exactly
``bf16(f32(W0) + f32(delta))``; adding in bfloat16 would round twice and drift. (Called eagerly the
rule is exact; inside a caller's ``jax.jit`` XLA may fuse the add into multiply-adds, which can
differ in the last float32 bit before the final rounding.) Products use
``Precision.HIGHEST`` so accelerators do not silently drop to bfloat16 passes for float32 merges.

Trainable extras (:class:`jlora.Trainable`, from ``LoraConfig.trainable``) are not updates but
replacements: ``merge`` puts their values in place of the base's leaves, exactly.
"""

from __future__ import annotations

from typing import Any

import jax

from . import _checks
from ._errors import AdapterMismatchError
from ._extras import Trainable, check_extra_fit
from ._factors import LoraFactors
from ._paths import is_box, leaves_with_paths, nest, path_to_str, unbox
from ._weight_merge import _check_finite, _combine, check_fit, factor_delta, replace_extra


def _is_factors(x: Any) -> bool:
    return isinstance(x, LoraFactors)


def _is_node(x: Any) -> bool:
    return isinstance(x, (LoraFactors, Trainable))


def adapter_tables(adapters: Any) -> tuple[dict[str, LoraFactors], dict[str, Trainable]]:
    """``({path: LoraFactors}, {path: Trainable})`` for an adapter pytree, each in tree order."""
    factors, extras = {}, {}
    for path, leaf in leaves_with_paths(adapters, is_leaf=_is_node):
        if isinstance(leaf, LoraFactors):
            factors[path] = unboxed(leaf)
        elif isinstance(leaf, Trainable):
            extras[path] = leaf
        else:
            raise AdapterMismatchError(
                f"{path or 'adapters'}: adapter tree holds a {type(leaf).__name__}, not LoraFactors or "
                "jlora.Trainable; expected the output of jlora.init (or a restored adapter "
                "checkpoint). A fully trained leaf goes in LoraConfig.trainable"
            )
    return factors, extras


def unboxed(f: LoraFactors) -> LoraFactors:
    """``f`` with plain arrays for factors that come boxed with logical axes (Linen models with
    ``nn.with_logical_partitioning``); every computation takes the plain form."""
    if not (is_box(f.a) or is_box(f.b)):
        return f
    return LoraFactors(unbox(f.a), unbox(f.b), f.scale, f.layout)


def factors_by_path(adapters: Any) -> dict[str, LoraFactors]:
    """``{path: LoraFactors}`` for an adapter pytree, in tree order (trainable extras left out)."""
    return adapter_tables(adapters)[0]


def _duplicate(key: str) -> AdapterMismatchError:
    return AdapterMismatchError(
        f"{key}: two leaves of the parameters have this '/'-joined path (a dict key containing "
        "'/' next to the nested keys it spells), so the adapter would be applied to both. "
        "Rename the key so that it holds no '/'"
    )


def _apply(params: Any, adapters: Any, *, subtract: bool, check_finite: bool = False) -> Any:
    _checks.adapters_given(adapters)
    _checks.flag(check_finite, "check_finite")
    table, extras = adapter_tables(adapters)
    seen = set()

    def leaf(path, w):
        if is_box(w):  # merge the weight inside, keep its sharding annotation
            return w.replace_boxed(leaf(path, unbox(w)))
        key = path_to_str(path)
        if key in seen:
            raise _duplicate(key)
        factors = table.get(key)
        if factors is None:
            extra = extras.get(key)
            if extra is None:
                return w
            seen.add(key)
            if subtract:  # the base's value is gone; see unmerge's docstring
                check_extra_fit(key, w, extra)
                return w
            return replace_extra(key, w, extra)
        seen.add(key)
        check_fit(key, w, factors)
        try:
            out = _combine(w, factors, subtract)
        except AdapterMismatchError as e:
            raise AdapterMismatchError(f"{key}: {e}") from None
        if check_finite:
            _check_finite(key, out, w)
        return out

    out = jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_box)
    missing = [p for p in [*table, *extras] if p not in seen]
    if missing:
        what = "factors" if missing[0] in table else "a trainable extra"
        raise AdapterMismatchError(
            f"{missing[0]}: the adapters have {what} at this path but the parameters have no such "
            f"weight ({len(missing)} such paths). Were these adapters made for another model?"
        )
    return out


def merge(params: Any, adapters: Any, *, check_finite: bool = False) -> Any:
    """Folds adapters into the base: ``W0 + scale * a @ b`` at each adapted weight.

    ``merge`` is pure: merging a tree that already holds the adapters adds them a second time.
    Keeping track of which trees are merged is the caller's job (:func:`unmerge` takes them out).

    Args:
        params: the base parameter pytree.
        adapters: adapters from :func:`jlora.init` (or training) for these params.
        check_finite: raise if a merged weight holds NaN/Inf where the base is finite (PEFT's
            ``safe_merge``). Off by default: it reads every merged weight back, a device-to-host
            synchronisation per weight, and it needs concrete arrays (not inside ``jax.jit``).

    Returns:
        A pytree like ``params``. Adapted leaves are new arrays of the base dtype, computed in
        float32 and rounded once, on the base weight's sharding; a trainable extra's leaf is the
        extra's value, exactly (on the base leaf's sharding); every other leaf is the very same
        object as in ``params``.

    Raises:
        AdapterMismatchError: an adapter's path is missing from ``params`` or its shapes do not fit;
            an adapted weight is not floating point; two leaves share an adapted path; an extra's
            shape or dtype differs from its base leaf's.
        NonFiniteError: with ``check_finite``, a merged weight holds new NaN/Inf values.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"dense": {"kernel": jnp.zeros((3, 2))}}
        >>> adapters = {"dense": {"kernel": jlora.LoraFactors(
        ...     jnp.ones((3, 1)), jnp.ones((1, 2)), scale=2.0, layout=jlora.Layout(1, 1))}}
        >>> merge(params, adapters)["dense"]["kernel"].tolist()
        [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
        >>> merge({"head": jnp.zeros(2)}, {"head": jlora.Trainable(jnp.ones(2))})["head"].tolist()
        [1.0, 1.0]
    """
    return _apply(params, adapters, subtract=False, check_finite=check_finite)


def unmerge(params: Any, adapters: Any) -> Any:
    """Inverts :func:`merge`: ``W - scale * a @ b`` at each adapted weight.

    ``unmerge(merge(p, f), f)`` equals ``p`` to float32 round-off (exactly, for values that float32
    sums represent exactly), except at trainable extras (:class:`jlora.Trainable`).

    A merge *replaced* each extra's leaf, and neither the merged tree nor the adapters hold the
    base's old value, so unmerge leaves those leaves as they are in ``params`` (the trained
    values) rather than guess. The result is still a base these adapters fit: every consumer of a
    ``(params, adapters)`` pair (``merge``, ``jlora.linen``, ``jlora.nnx``) replaces those leaves by
    the adapters' extras, so ``merge(unmerge(m, f), f)`` equals ``m`` there bit for bit. To get the
    original values back, take them from the original base.

    Args:
        params: merged parameters.
        adapters: the adapters that were merged in.

    Returns:
        A pytree like ``params`` with the adapters' deltas taken out; extras' leaves unchanged.

    Raises:
        AdapterMismatchError: as for :func:`merge`.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"w": jnp.ones((2, 2))}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig(targets="w", rank=1))
        >>> adapters = jax.tree.map(jnp.ones_like, adapters)
        >>> bool((unmerge(merge(params, adapters), adapters)["w"] == params["w"]).all())
        True
    """
    return _apply(params, adapters, subtract=True)


def delta(adapters: Any) -> dict[str, Any]:
    """The weight update ``scale * a @ b`` of each adapter, in float32, shaped like its weight.

    Trainable extras have no low-rank update (theirs is the extra minus a base value the adapters
    do not hold), so they are left out of the result.

    Args:
        adapters: an adapter pytree.

    Returns:
        A pytree of the same structure as ``adapters`` with a float32 array at each adapter
        (a nested dict of the factor paths alone when the tree holds extras).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = jlora.LoraFactors(jnp.ones((4, 1)), jnp.ones((1, 3)), 0.5, jlora.Layout(1, 1))
        >>> delta({"w": f})["w"].shape
        (4, 3)
    """
    _checks.adapters_given(adapters)
    table, extras = adapter_tables(adapters)  # validates the tree
    if extras:
        return nest({path: factor_delta(f) for path, f in table.items()})
    return jax.tree_util.tree_map(factor_delta, adapters, is_leaf=_is_factors)
