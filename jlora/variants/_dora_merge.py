"""DoRA merged into the base and back: ``dora_merge`` and ``dora_unmerge`` (maths in ``_dora``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from .._paths import is_box, path_to_str
from .._weight_merge import _on_sharding_of, factor_delta
from ._dora import _factor_order, _from_factor_order, _table


def _combine(params: Any, adapters: Any, magnitudes: Any, op: str, norms: Any = None) -> Any:
    entries = _table(params, adapters, op)
    mags = dict(_flat(magnitudes))
    given = dict(_flat(norms)) if norms is not None else None
    out = {}
    for path, w, f in entries:
        stack, _, fan_out = f.layout.split(tuple(w.shape))
        m = mags.get(path)
        if m is None or tuple(m.shape) != (*stack, *fan_out):
            raise AdapterMismatchError(
                f"{path}: {op}: expected a magnitude of shape {(*stack, *fan_out)} (one per output "
                f"unit), found {None if m is None else tuple(m.shape)}; make them with "
                "dora_magnitudes(params, adapters)"
            )
        if given is None:
            new = _merge_one(jnp.asarray(w), f, m)
        else:
            n = given.get(path)
            if n is None or tuple(n.shape) != tuple(m.shape):
                raise AdapterMismatchError(
                    f"{path}: dora_unmerge: expected norms of shape {tuple(m.shape)}, found "
                    f"{None if n is None else tuple(n.shape)}; pass dora_magnitudes(params, "
                    "adapters) computed before the merge"
                )
            new = _unmerge_one(jnp.asarray(w), f, m, n)
        out[path] = _on_sharding_of(new, w)

    def leaf(path: Any, w: Any) -> Any:
        key = path_to_str(path)
        if key not in out:
            return w
        return w.replace_boxed(out[key]) if is_box(w) else out[key]

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_box)


@jax.jit
def _merge_one(w: jax.Array, f: LoraFactors, m: jax.Array) -> jax.Array:
    """``m V / ||V||_c`` with ``V = W0 + scale a b``, in float32, rounded once to ``w``'s dtype."""
    w2, shape = _factor_order(w.astype(jnp.float32), f)
    v = w2 + _factor_order(factor_delta(f), f)[0]
    m2 = m.astype(jnp.float32).reshape(*w2.shape[:-2], 1, w2.shape[-1])
    n = jnp.sqrt(jnp.sum(v * v, axis=-2, keepdims=True))
    return _from_factor_order(v * (m2 / n), shape, f).astype(w.dtype)


@jax.jit
def _unmerge_one(w: jax.Array, f: LoraFactors, m: jax.Array, n: jax.Array) -> jax.Array:
    """``W ||V||_c / m - scale a b``, in float32, rounded once to ``w``'s dtype."""
    w2, shape = _factor_order(w.astype(jnp.float32), f)
    m2 = m.astype(jnp.float32).reshape(*w2.shape[:-2], 1, w2.shape[-1])
    n2 = n.astype(jnp.float32).reshape(m2.shape)
    new = w2 * (n2 / m2) - _factor_order(factor_delta(f), f)[0]
    return _from_factor_order(new, shape, f).astype(w.dtype)


def _flat(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_to_str(p), x) for p, x in flat]


def dora_merge(params: Any, adapters: Any, magnitudes: Any) -> Any:
    """Folds DoRA adapters into the base: ``m * (W0 + scale a b) / ||W0 + scale a b||_c``.

    Formed in float32 and rounded once to each weight's dtype, on its sharding. The merge
    materialises ``V`` (it is the merged weight's size anyway). Keep ``dora_magnitudes(params,
    adapters)`` of the *trained* adapters if you will :func:`dora_unmerge`: the merged weight
    does not determine ``||V||_c``.

    Args:
        params: the base parameters.
        adapters: the trained adapters.
        magnitudes: the trained magnitudes ``{path: m}``.

    Returns:
        A pytree like ``params`` with the adapted weights replaced.

    Raises:
        AdapterMismatchError: adapters or magnitudes do not fit the weights.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.variants import dora_magnitudes, dora_merge
        >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 2.0]])}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig("w", rank=1))
        >>> m = jax.tree.map(lambda m: 2 * m, dora_magnitudes(params, adapters))
        >>> dora_merge(params, adapters, m)["w"].tolist()
        [[6.0, 0.0], [8.0, 4.0]]
    """
    return _combine(params, adapters, magnitudes, "dora_merge")


def dora_unmerge(merged: Any, adapters: Any, magnitudes: Any, norms: Any) -> Any:
    """Inverts :func:`dora_merge` given the column norms ``||W0 + scale a b||_c`` it divided by.

    ``W0 = W * ||V||_c / m - scale a b``. The merged weight alone does not determine the norms
    (any positive rescaling of a column of ``V`` merges to the same weight), so pass
    ``dora_magnitudes(params, adapters)`` computed before the merge (PEFT caches them too).

    Args:
        merged: merged parameters.
        adapters: the adapters that were merged in.
        magnitudes: the magnitudes that were merged in.
        norms: ``{path: ||V||_c}`` of the base, as :func:`dora_magnitudes` returns them.

    Returns:
        A pytree like ``merged`` with the base weights back (to float32 round-off).

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.variants import dora_magnitudes, dora_merge, dora_unmerge
        >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 2.0]])}
        >>> adapters = jlora.init(jax.random.key(0), params, jlora.LoraConfig("w", rank=1))
        >>> norms = dora_magnitudes(params, adapters)
        >>> m = jax.tree.map(lambda m: 2 * m, norms)
        >>> dora_unmerge(dora_merge(params, adapters, m), adapters, m, norms)["w"].tolist()
        [[3.0, 0.0], [4.0, 2.0]]
    """
    return _combine(merged, adapters, magnitudes, "dora_unmerge", norms=norms)
