"""Exact weighted combination of adapters: one adapter whose delta is the weighted sum of deltas.

For adapters ``k = 1..K`` of one base with weights ``w_k``, at every path

    sum_k w_k scale_k a_k b_k = [a_1 ... a_K] [w_1 scale_1 b_1; ...; w_K scale_K b_K]

so concatenating the ``a``s along the rank axis and the scaled ``b``s along theirs gives one adapter
of rank ``sum_k r_k`` and scale 1 whose delta is the weighted sum exactly (up to the float32
rounding of ``w_k scale_k b_k``). This is PEFT's ``add_weighted_adapter(combination_type="cat")``
with PEFT's weights applied to ``b`` only. A path some adapters leave out gets the others' terms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._config import LoraConfig
from .._errors import AdapterMismatchError
from .._factors import LoraFactors
from .._paths import nest, unbox
from ._slots import adapter_table


def combine(adapters: Sequence[Any], weights: Sequence[float]) -> tuple[dict[str, Any], LoraConfig]:
    """One adapter equal to ``sum_k weights[k] * delta(adapters[k])``, and its config.

    Args:
        adapters: adapter trees of one base.
        weights: one real weight per adapter (negative weights subtract).

    Returns:
        ``(adapters, config)``: ranks are the sums of the ranks at each path and every scale is 1
        (the config's ``alpha_pattern`` says so), so ``jlora.checkpoint.save`` takes the pair.

    Raises:
        AdapterMismatchError: the adapters give one path different layouts or weight shapes.
        ValueError: not one weight per adapter.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.serving import combine
        >>> params = {"w": jnp.ones((6, 4))}
        >>> one, two = (jax.tree.map(jnp.ones_like, jlora.init(jax.random.key(i), params,
        ...     jlora.LoraConfig(targets="w", rank=r, alpha=r))) for i, r in ((0, 1), (1, 2)))
        >>> mixed, config = combine([one, two], [0.5, 0.25])
        >>> mixed["w"].rank, float(jlora.delta(mixed)["w"][0, 0]), config.scale_for("w")
        (3, 1.0, 1.0)
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(
            f"combine: {len(adapters)} adapters and {len(weights)} weights; expected one weight "
            "per adapter, at least one adapter"
        )
    by_path: dict[str, list[tuple[float, LoraFactors]]] = {}
    for k, (tree, weight) in enumerate(zip(adapters, weights, strict=True)):
        for path, f in adapter_table(tree, f"adapter {k}").items():
            by_path.setdefault(path, []).append((float(weight), f))
    out, ranks, layouts = {}, {}, {}
    for path, terms in by_path.items():
        first = terms[0][1]
        n_stack = first.a.ndim - 1 - first.layout.fan_in_ndim
        for _, f in terms[1:]:
            if f.layout != first.layout or f.a.shape[:-1] != first.a.shape[:-1]:
                raise AdapterMismatchError(
                    f"{path}: adapters with a {first.a.shape} ({first.layout}) and a {f.a.shape} "
                    f"({f.layout}) here; combine takes adapters of one base and layout"
                )
        a = jnp.concatenate([f.a.astype(jnp.float32) for _, f in terms], axis=-1)
        b = jnp.concatenate(
            [f.b.astype(jnp.float32) * jnp.float32(w * f.scale) for w, f in terms], axis=n_stack
        )
        out[path] = LoraFactors(a, b, 1.0, first.layout)
        key = re.escape(path)
        ranks[key] = a.shape[-1]
        layouts[key] = first.layout.spec(first.a.ndim - 1 + first.layout.fan_out_ndim)
    return nest(out), _unit_scale_config(ranks, layouts)


def _unit_scale_config(ranks: dict[str, int], layouts: dict[str, str]) -> LoraConfig:
    """The config of adapters with these ranks and layouts and every scale 1 (alpha = rank)."""
    return LoraConfig(
        targets=tuple(ranks),
        rank_pattern=ranks,
        alpha_pattern={k: float(r) for k, r in ranks.items()},
        layouts=layouts,
    )


def _truncate_one(f: LoraFactors, rank: int) -> tuple[LoraFactors, jax.Array]:
    a = unbox(f.a).astype(jnp.float32)
    n_stack = a.ndim - 1 - f.layout.fan_in_ndim
    b = unbox(f.b).astype(jnp.float32) * jnp.float32(f.scale)
    stack, r = a.shape[:n_stack], a.shape[-1]
    a2 = a.reshape(math.prod(stack), -1, r)  # (S, fan_in, r)
    bt = jnp.swapaxes(b.reshape(math.prod(stack), r, -1), 1, 2)  # (S, fan_out, r)
    hi = jax.lax.Precision.HIGHEST
    qa, ra = jnp.linalg.qr(a2)  # delta = qa (ra rb^T) qb^T: the SVD of a small core
    qb, rb = jnp.linalg.qr(bt)
    u, s, vt = jnp.linalg.svd(jnp.matmul(ra, jnp.swapaxes(rb, 1, 2), precision=hi))
    k = min(rank, s.shape[-1])
    new_a = jnp.matmul(qa, u[..., :k], precision=hi)  # orthonormal columns
    new_b = s[..., :k, None] * jnp.matmul(vt[..., :k, :], jnp.swapaxes(qb, 1, 2), precision=hi)
    error = jnp.sqrt(jnp.sum(jnp.square(s[..., k:])))
    new_a = new_a.reshape(*stack, *a.shape[n_stack:-1], k)
    new_b = new_b.reshape(*stack, k, *b.shape[n_stack + 1 :])
    return LoraFactors(new_a, new_b, 1.0, f.layout), error


def truncate(adapters: Any, rank: int) -> tuple[dict[str, Any], LoraConfig, dict[str, float]]:
    """The best rank-``rank`` adapter (in Frobenius norm) for each weight's delta, by SVD.

    Computed through the factors, never the ``fan_in x fan_out`` delta: with ``a = Qa Ra`` and
    ``(scale b)^T = Qb Rb`` (QR), ``delta = Qa (Ra Rb^T) Qb^T``, so the SVD of the ``r x r`` core
    ``Ra Rb^T = U S V^T`` gives ``delta``'s: ``a' = Qa U_k`` (orthonormal columns) and
    ``b' = S_k (Qb V_k)^T``, scale 1. The error is exact from the singular values dropped,
    ``||delta - a' b'||_F = sqrt(sum_{i>k} s_i^2)`` (Eckart-Young). Stacked weights are truncated
    per slice (the error is over the whole stack). Apply it to :func:`combine`'s output for PEFT's
    ``add_weighted_adapter(combination_type="svd")``: PEFT puts ``S`` on ``lora_B`` as here, and
    multiplies each delta by its adapter's scale twice (``weight * scaling`` times
    ``get_delta_weight``, already scaled), so PEFT's svd with weights ``w`` is
    ``truncate(combine(adapters, [w_k * scale_k])[0], rank)`` (to the SVD's signs).

    Args:
        adapters: an adapter tree (e.g. ``combine``'s).
        rank: the target rank; a weight whose delta has a lower rank keeps that (exactly).

    Returns:
        ``(adapters, config, errors)``: the truncated adapters (float32, scale 1), their config,
        and ``{path: Frobenius norm of the delta dropped}``.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> from jlora.serving import truncate
        >>> params = {"w": jnp.ones((6, 4))}
        >>> one = jax.tree.map(jnp.ones_like, jlora.init(jax.random.key(0), params,
        ...     jlora.LoraConfig(targets="w", rank=3, alpha=3)))  # delta = 3 * ones: rank 1
        >>> small, config, errors = truncate(one, 1)
        >>> small["w"].rank, round(errors["w"], 4), config.scale_for("w")
        (1, 0.0, 1.0)
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"truncate: rank {rank!r} is invalid; expected an int >= 1")
    out, ranks, layouts, errors = {}, {}, {}, {}
    for path, f in adapter_table(adapters, "truncate's adapters").items():
        out[path], error = _truncate_one(f, rank)
        errors[path] = float(error)
        key = re.escape(path)
        ranks[key] = out[path].rank
        layouts[key] = f.layout.spec(f.a.ndim - 1 + f.layout.fan_out_ndim)
    return nest(out), _unit_scale_config(ranks, layouts), errors
