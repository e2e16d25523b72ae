"""Low-rank dense layers: the weight *is* a rank-``r`` product ``a @ b``, with no frozen ``W0``.

``y = x a b + bias`` with ``a: (fan_in, r)`` and ``b: (r, fan_out)`` costs ``r (n + m)`` parameters
instead of ``n m`` (``n = fan_in``, ``m = fan_out``). :class:`LowRankDense` (Linen) and
:class:`LowRankLinear` (NNX) are drop-in replacements for ``nn.Dense`` / ``nnx.Linear``.

Initialisation, and why the output variance matches a full-rank layer
-----------------------------------------------------------------------
Flax initialises a Dense kernel ``W`` with ``lecun_normal``: i.i.d. entries of mean 0 and variance
exactly ``1/n`` (a truncated normal rescaled to that variance). For any fixed input ``x`` each
output ``y_j = sum_i x_i W_ij`` then has mean 0 and ``E[y_j^2 | x] = |x|^2 / n``.

For ``W = a b`` with independent zero-mean entries of variances ``s_a^2`` and ``s_b^2``,

    E[y_j^2 | x] = sum_k E[(x a_k)^2] E[b_kj^2] = r * |x|^2 s_a^2 * s_b^2,

so the full-rank variance needs ``s_a^2 s_b^2 = 1 / (n r)``. Two stacked default-initialised Dense
layers, ``Dense(r)`` then ``Dense(m)`` (``init_scheme="autoencoder"``), have fan-ins ``n`` and ``r``:
``s_a^2 s_b^2 = (1/n)(1/r)``. **So under Flax's defaults the autoencoder variant already has the
full-rank output variance**, exactly; the fan-in scaling of the second layer is what makes it
rank-aware. (Not so with PyTorch's ``nn.Linear`` default, variance ``1/(3 fan_in)``: stacking two
gives ``1/(9n)`` against ``1/(3n)`` for one, a third of the variance.) Its intermediate bias is
omitted: it would add ``c b``, a constant the output bias already expresses.

The default, ``init_scheme="rank_aware"``, matches the same variance with a different structure:
the spectral initialisation of Khodak et al. (2021), plus a rescale that makes the variance exact.
Draw a full-rank weight ``G ~ N(0, 1/n)`` (``n x m``, untruncated: the argument below needs its
rotation invariance), keep its top ``r`` singular triplets ``G_r = U_r S_r V_r^T``, rescale by
``c = |G|_F / |G_r|_F`` and split the result evenly,

    a = U_r sqrt(c S_r),    b = sqrt(c S_r) V_r^T,    so  a b = c G_r  and  |a b|_F = |G|_F.

The Gaussian ``G`` is invariant under rotations on either side and the truncation commutes with
them, so ``E[W W^T]`` is a multiple of the identity and the columns of ``W = a b`` are
exchangeable; with ``E|W|_F^2 = E|G|_F^2 = m`` this gives ``E[w_j w_j^T] = I / n`` and hence
``E[y_j^2 | x] = |x|^2 / n`` for every ``x``: exactly the full-rank variance. Unlike the
autoencoder's independent factors, these are balanced (``a^T a = b b^T``) and orthogonal, and
``a b`` spans the leading directions of a full-rank draw. It costs one SVD of ``n x m`` at init.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from ._checks import prng_key
from ._errors import ConfigError

__all__ = ["LowRankDense", "LowRankLinear", "init_factors"]

Init = Literal["rank_aware", "autoencoder"]
_ZEROS = jax.nn.initializers.zeros
_INITS = ("rank_aware", "autoencoder")


def _check(fan_in: int, fan_out: int, rank: Any, init_scheme: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(fan_in, fan_out):
        raise ConfigError(
            f"low-rank layer {fan_in} -> {fan_out}: rank {rank!r} is invalid; expected an integer "
            f"in [1, min(fan_in, fan_out)] = [1, {min(fan_in, fan_out)}] (a full-rank product "
            "saves nothing: use a Dense layer)"
        )
    if init_scheme not in _INITS:
        raise ConfigError(
            f"low-rank layer: init_scheme {init_scheme!r} is unknown; expected one of {_INITS}"
        )


def init_factors(
    key: jax.Array,
    fan_in: int,
    fan_out: int,
    rank: int,
    *,
    init_scheme: Init = "rank_aware",
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Initial factors ``a: (fan_in, rank)``, ``b: (rank, fan_out)`` of a low-rank layer.

    Both schemes give ``y = x a b`` the output variance of a full-rank Dense layer with Flax's
    default init, ``E[y_j^2 | x] = |x|^2 / fan_in`` (see the module docstring for the maths).

    Args:
        key: a PRNG key.
        fan_in: input features ``n``.
        fan_out: output features ``m``.
        rank: ``r``, in ``[1, min(n, m)]``.
        init_scheme: ``"rank_aware"`` (spectral: the rescaled top-``r`` part of a full-rank Gaussian
            draw, split evenly between the factors) or ``"autoencoder"`` (two default Dense
            kernels: ``a, b = lecun_normal(k1), lecun_normal(k2)`` with ``k1, k2 = split(key)``).
        dtype: dtype of the factors (computed in float32, cast once).

    Returns:
        ``(a, b)``.

    Raises:
        ConfigError: ``rank`` is out of range or ``init_scheme`` unknown.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> a, b = init_factors(jax.random.key(0), 64, 32, 4)
        >>> a.shape, b.shape
        ((64, 4), (4, 32))
        >>> bool(jnp.allclose(a.T @ a, b @ b.T, atol=1e-5))  # balanced factors
        True
    """
    _check(fan_in, fan_out, rank, init_scheme)
    prng_key(key, "key")
    if init_scheme == "autoencoder":
        k1, k2 = jax.random.split(key)
        dense = jax.nn.initializers.lecun_normal()
        return dense(k1, (fan_in, rank), dtype), dense(k2, (rank, fan_out), dtype)
    g = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    u, s, vt = jnp.linalg.svd(g, full_matrices=False)
    c = jnp.sqrt(jnp.sum(s**2) / jnp.sum(s[:rank] ** 2))
    root = jnp.sqrt(c * s[:rank])
    return (u[:, :rank] * root[None, :]).astype(dtype), (root[:, None] * vt[:rank]).astype(dtype)


def _apply(x, a, b, bias, dtype, precision):
    x, a, b, bias = promote_dtype(x, a, b, bias, dtype=dtype)
    y = jnp.tensordot(jnp.tensordot(x, a, axes=1, precision=precision), b, 1, precision=precision)
    return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


class LowRankDense(nn.Module):
    """A Linen Dense layer whose kernel is the rank-``r`` product ``a @ b``.

    Parameters: ``a: (fan_in, rank)``, ``b: (rank, features)`` and ``bias: (features,)``.

    Attributes:
        features: output features.
        rank: rank ``r`` of the kernel, at most ``min(fan_in, features)``.
        init_scheme: ``"rank_aware"`` or ``"autoencoder"`` (see :func:`init_factors`).
        use_bias: add a bias.
        dtype: computation dtype (inferred from inputs and params by default).
        param_dtype: dtype of the parameters.
        bias_init: initialiser of the bias.
        precision: matmul precision.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> layer = LowRankDense(features=32, rank=4)
        >>> params = layer.init(jax.random.key(0), jnp.ones((2, 64)))["params"]
        >>> jax.tree.map(jnp.shape, params)
        {'a': (64, 4), 'b': (4, 32), 'bias': (32,)}
        >>> layer.apply({"params": params}, jnp.ones((2, 64))).shape
        (2, 32)
    """

    features: int
    rank: int
    init_scheme: Init = "rank_aware"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    bias_init: Any = _ZEROS
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x a b + bias`` over the last axis of ``x``."""
        fan_in = x.shape[-1]
        _check(fan_in, self.features, self.rank, self.init_scheme)
        factors = (None, None)
        if not (self.has_variable("params", "a") and self.has_variable("params", "b")):
            # Both factors come from one draw (the rank-aware init splits one SVD between them).
            factors = init_factors(
                self.make_rng("params"),
                fan_in,
                self.features,
                self.rank,
                init_scheme=self.init_scheme,
                dtype=self.param_dtype,
            )
        a = self.param("a", lambda _: factors[0])
        b = self.param("b", lambda _: factors[1])
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        return _apply(x, a, b, bias, self.dtype, self.precision)


class LowRankLinear(nnx.Module):
    """An NNX linear layer whose kernel is the rank-``r`` product ``a @ b``.

    Parameters: ``a: (in_features, rank)``, ``b: (rank, out_features)`` and ``bias``, all
    ``nnx.Param``.

    Args:
        in_features: input features.
        out_features: output features.
        rank: rank ``r`` of the kernel, at most ``min(in_features, out_features)``.
        init_scheme: ``"rank_aware"`` or ``"autoencoder"`` (see :func:`init_factors`); the
            factors are ``init_factors(rngs.params(), ...)``.
        use_bias: add a bias.
        dtype: computation dtype (inferred from inputs and params by default).
        param_dtype: dtype of the parameters.
        bias_init: initialiser of the bias.
        precision: matmul precision.
        rngs: ``nnx.Rngs`` with a ``params`` (or ``default``) stream.

    Raises:
        ConfigError: ``rank`` is out of range or ``init_scheme`` unknown.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = LowRankLinear(64, 32, rank=4, rngs=nnx.Rngs(0))
        >>> layer.a.shape, layer.b.shape, layer(jnp.ones((2, 64))).shape
        ((64, 4), (4, 32), (2, 32))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        init_scheme: Init = "rank_aware",
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        bias_init: Any = _ZEROS,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        a, b = init_factors(
            rngs.params(),
            in_features,
            out_features,
            rank,
            init_scheme=init_scheme,
            dtype=param_dtype,
        )
        self.a = nnx.Param(a)
        self.b = nnx.Param(b)
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dtype, self.precision = dtype, precision

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x a b + bias`` over the last axis of ``x``."""
        bias = None if self.bias is None else self.bias[...]
        return _apply(x, self.a[...], self.b[...], bias, self.dtype, self.precision)
