"""The embedding's two products: the lookup ``scale * a[ids] b`` and, for a tied embedding used as
output head, ``scale * (x b^T) a^T``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from .. import _checks, _explicit
from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from ._operands import LORA_INPUT, _check_floating, _one_layer


def lookup_branch(ids: jax.Array, factors: LoraFactors) -> jax.Array:
    """The LoRA term of an embedding lookup: ``scale * a[ids] b``.

    Args:
        ids: integer token ids of any shape.
        factors: ``a: (vocab, r)``, ``b: (r, features)``.

    Returns:
        ``(*ids.shape, features)`` in the factors' dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = jlora.LoraFactors(jnp.ones((10, 2)), jnp.ones((2, 3)), 1.0, jlora.Layout(1, 1, True))
        >>> lookup_branch(jnp.array([[1, 2]]), f).tolist()
        [[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]]
    """
    a, b = _one_layer(factors, "lookup_branch")
    if not jnp.issubdtype(getattr(ids, "dtype", None) or np.float64, jnp.integer):
        raise TypeError(
            f"lookup_branch: ids is {_checks.found(ids)} with dtype {getattr(ids, 'dtype', None)}; "
            "expected integer token ids (an int32 array)"
        )
    a_entries, ids_entries = _explicit.entries(a), _explicit.entries(ids)
    if a_entries is None and ids_entries is None:
        rows = jnp.take(a, ids, axis=0)
    else:
        # Explicit sharding: jax cannot infer a gather's output sharding when the table or the ids
        # are split, so name it: rows follow the ids (gathering at most a rank-r table).
        spec = (*(ids_entries or (None,) * ids.ndim), None)
        out = _explicit.sharding(a if a_entries is not None else ids, spec)
        rows = a.at[ids].get(mode="fill", out_sharding=out)  # jnp.take's mode
    rows = rows * factors.scale
    return jnp.matmul(
        rows, b, out_sharding=_explicit.dot_sharding(rows, b, _explicit.matmul_dims(rows.ndim))
    )


def attend_branch(x: jax.Array, factors: LoraFactors) -> jax.Array:
    """The LoRA term of a tied embedding used as output head: ``scale * (x b^T) a^T``.

    Args:
        x: ``(..., features)``.
        factors: ``a: (vocab, r)``, ``b: (r, features)``.

    Returns:
        ``(..., vocab)`` logits' LoRA term in ``x``'s dtype.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> f = jlora.LoraFactors(jnp.ones((10, 2)), jnp.ones((2, 3)), 1.0, jlora.Layout(1, 1, True))
        >>> attend_branch(jnp.ones((4, 3)), f).shape
        (4, 10)
    """
    a, b = _one_layer(factors, "attend_branch")
    _check_floating(x, "attend_branch")
    if x.shape[-1:] != b.shape[-1:]:
        raise AdapterMismatchError(
            f"attend_branch: the query's last axis {x.shape[-1:]} does not match the embedding's "
            f"features {b.shape[-1:]}; were these factors made for another layer?"
        )
    x = checkpoint_name(x, LORA_INPUT)
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    xb = jnp.tensordot(x, b, axes=dims[0], out_sharding=_explicit.dot_sharding(x, b, dims))
    xb = xb * factors.scale
    return jnp.tensordot(xb, a, axes=dims[0], out_sharding=_explicit.dot_sharding(xb, a, dims))
