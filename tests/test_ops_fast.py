"""The optimised dense product of jlora.ops computes the plain path's numbers.

``dense_branch`` runs on 2-D views with ``a`` entering transposed behind an optimisation barrier
(so XLA:CPU forms the gradient of ``a`` rank-axis-leading). These tests pin that this changes no
number: values and gradients against float64 NumPy (with dropout, multi-axis fan-in/fan-out, extra
leading axes, bfloat16 activations), agreement with plain autodiff of ``(x a) b`` and with its own
jitted gradient (each to float32 round-off of float64: ``numerics``), the remat name, and that no
equation of the jaxpr produces a ``fan_in x fan_out`` array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_within_roundoff

import jlora
from jlora import ops


def _factors(rng, fan_in, fan_out, rank=3, scale=0.7, dtype=np.float32):
    a = rng.normal(size=(*fan_in, rank)).astype(dtype)
    b = rng.normal(size=(rank, *fan_out)).astype(dtype)
    return jlora.LoraFactors(
        jnp.asarray(a), jnp.asarray(b), scale, jlora.Layout(len(fan_in), len(fan_out))
    )


def _reference(x, a, b, scale, g):
    """Value and gradients of ``sum(g * scale (x a) b)`` in float64, on flattened 2-D views."""
    n_in = a.ndim - 1
    x2 = np.asarray(x, np.float64).reshape(-1, int(np.prod(a.shape[:-1])))
    a2 = np.asarray(a, np.float64).reshape(x2.shape[1], -1)
    b2 = np.asarray(b, np.float64).reshape(a2.shape[1], -1)
    g2 = np.asarray(g, np.float64).reshape(x2.shape[0], -1)
    out = scale * (x2 @ a2) @ b2
    g_r = scale * g2 @ b2.T
    grad_x = (g_r @ a2.T).reshape(x.shape)
    grad_a = (x2.T @ g_r).reshape(a.shape)
    grad_b = (scale * (x2 @ a2).T @ g2).reshape(b.shape)
    lead = x.shape[: x.ndim - n_in]
    return out.reshape(*lead, *b.shape[1:]), grad_x, grad_a, grad_b


NAMES = ("out", "grad x", "grad a", "grad b")


def _assert_within_roundoff(got, x, a, b, scale, g, *, g_magnitude=None, extra_terms=0):
    """``got`` ({name: array} of NAMES) against ``_reference`` in float64.

    The magnitudes are ``_reference`` of the absolute values (with ``g_magnitude`` for ``|g|``
    where the upstream gradient carries an error of its own); a result went through at most the
    four sums (fan-in, rank, fan-out, rows) and a few scalings.
    """
    want = dict(zip(NAMES, _reference(x, a, b, scale, g), strict=True))
    g_magnitude = g if g_magnitude is None else g_magnitude
    abs_inputs = (np.abs(np.asarray(t, np.float64)) for t in (x, a, b, scale, g_magnitude))
    magnitude = dict(zip(NAMES, _reference(*abs_inputs), strict=True))
    n_rows = int(np.prod(np.shape(g))) // int(np.prod(b.shape[1:]))
    terms = int(np.prod(a.shape[:-1])) + a.shape[-1] + int(np.prod(b.shape[1:])) + n_rows + 3
    for name, got_leaf in got.items():
        assert got_leaf.shape == want[name].shape, name
        assert_within_roundoff(
            got_leaf, want[name], magnitude[name], terms=terms + extra_terms, err_msg=name
        )


def _value_and_grads(x, f, g, **kwargs):
    def total(x, f):
        return jnp.sum(ops.dense_branch(x, f, **kwargs) * g)

    out = ops.dense_branch(x, f, **kwargs)
    grad_x, grad_f = jax.grad(total, argnums=(0, 1))(x, f)
    return out, grad_x, grad_f.a, grad_f.b


@pytest.mark.parametrize(
    ("x_shape", "fan_in", "fan_out"),
    [
        ((5, 6), (6,), (4,)),  # Dense
        ((2, 3, 6), (6,), (4,)),  # leading batch and sequence axes
        ((2, 3, 4, 2), (4, 2), (5,)),  # attention output projection (heads, head_dim) -> d
        ((3, 6), (6,), (2, 4)),  # DenseGeneral query d -> (heads, head_dim)
        ((6,), (6,), (4,)),  # a single row, no leading axes
    ],
)
def test_values_and_gradients_equal_float64(x_shape, fan_in, fan_out):
    rng = np.random.default_rng(1)
    f = _factors(rng, fan_in, fan_out)
    x = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
    g = jnp.asarray(
        rng.normal(size=(*x_shape[: len(x_shape) - len(fan_in)], *fan_out)), jnp.float32
    )
    got = _value_and_grads(x, f, g)
    assert all(leaf.dtype == jnp.float32 for leaf in got)
    _assert_within_roundoff(dict(zip(NAMES, got, strict=True)), x, f.a, f.b, f.scale, g)


def test_equals_plain_autodiff_of_the_factored_product():
    rng = np.random.default_rng(2)
    f = _factors(rng, (16,), (12,), rank=4)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(3, 5, 12)).astype(np.float32))

    def plain(x, a, b):
        xa = jnp.tensordot(x, a, axes=1) * f.scale
        return jnp.sum(jnp.tensordot(xa, b, axes=1) * g)

    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(x, f.a, f.b)
    got_value, (grad_x, grad_f) = jax.value_and_grad(
        lambda x, f: jnp.sum(ops.dense_branch(x, f) * g), argnums=(0, 1)
    )(x, f)
    # Different programs (a hand VJP on 2-D views vs autodiff of tensordots) may sum in other
    # orders: both must be within float32 round-off of float64, not bit-equal to each other.
    # The value sums out * g: out's fan-in and rank sums, then one of out.size terms.
    x64, a64, b64, g64 = (np.asarray(t, np.float64) for t in (x, f.a, f.b, g))
    value = np.sum(_reference(x64, a64, b64, f.scale, g64)[0] * g64)
    magnitude = np.sum(_reference(*map(np.abs, (x64, a64, b64, f.scale, g64)))[0] * np.abs(g64))
    for got in ((got_value, grad_x, grad_f.a, grad_f.b), (want[0], *want[1])):
        assert_within_roundoff(got[0], value, magnitude, terms=16 + 4 + g.size + 2, err_msg="value")
        _assert_within_roundoff(dict(zip(NAMES[1:], got[1:], strict=True)), x, f.a, f.b, f.scale, g)


def test_dropout_values_and_gradients_equal_float64():
    rng = np.random.default_rng(3)
    f = _factors(rng, (20,), (9,))
    x = jnp.asarray(rng.normal(size=(2, 8, 20)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(2, 8, 9)).astype(np.float32))
    key = jax.random.key(11)
    out, grad_x, grad_a, grad_b = _value_and_grads(x, f, g, dropout_rate=0.3, rng=key)
    keep = np.asarray(ops.dropout(jnp.ones(x.shape), 0.3, key)) != 0  # the mask dense_branch uses
    dropped = np.where(keep, np.asarray(x, np.float64) / 0.7, 0.0)
    # The float32 scaling by 1/0.7 (on the way in, and out for grad x) rounds twice more.
    got = {"out": out, "grad a": grad_a, "grad b": grad_b}
    _assert_within_roundoff(got, dropped, f.a, f.b, f.scale, g, extra_terms=2)
    abs_inputs = (np.abs(np.asarray(t, np.float64)) for t in (dropped, f.a, f.b, f.scale, g))
    magnitude = _reference(*abs_inputs)[1] / 0.7
    want = np.where(keep, _reference(dropped, f.a, f.b, f.scale, g)[1] / 0.7, 0.0)
    terms = 20 + 3 + 9 + 16 + 3 + 2  # the four sums, the scalings, the two divisions
    assert_within_roundoff(grad_x, want, magnitude, terms=terms, err_msg="grad x")


def test_bfloat16_activations_with_float32_factors():
    rng = np.random.default_rng(4)
    f = _factors(rng, (32,), (24,), rank=4, scale=0.5)
    x32 = rng.normal(size=(4, 32)).astype(np.float32)
    g32 = rng.normal(size=(4, 24)).astype(np.float32)
    x, g = jnp.asarray(x32, jnp.bfloat16), jnp.asarray(g32, jnp.bfloat16)
    out, grad_x, grad_a, grad_b = _value_and_grads(x, f, g)
    # Activations stay bfloat16; the factors' gradients come back in the factors' float32.
    assert (out.dtype, grad_x.dtype, grad_a.dtype, grad_b.dtype) == (
        jnp.bfloat16,
        jnp.bfloat16,
        jnp.float32,
        jnp.float32,
    )
    # Reference on the bfloat16-rounded inputs; bfloat16 keeps 8 bits of mantissa.
    want = _reference(
        np.asarray(x, np.float32),
        np.asarray(f.a),
        np.asarray(f.b),
        f.scale,
        np.asarray(g, np.float32),
    )
    for name, got_leaf, w in zip(
        ("out", "grad x", "grad a", "grad b"), (out, grad_x, grad_a, grad_b), want, strict=True
    ):
        got64 = np.asarray(got_leaf, np.float64)
        assert np.max(np.abs(got64 - w)) <= 3e-2 * np.max(np.abs(w)), name


def test_adapter_input_carries_the_remat_name():
    f = _factors(np.random.default_rng(5), (8,), (6,))
    jaxpr = jax.make_jaxpr(lambda x, f: ops.dense_branch(x, f))(jnp.ones((2, 3, 8)), f)
    names = [e.params["name"] for e in jaxpr.eqns if e.primitive.name == "name"]
    assert names == [ops.LORA_INPUT] == ["lora_input"]
    # The named value is the (rows, fan_in) view the backward pass keeps.
    (named,) = [e for e in jaxpr.eqns if e.primitive.name == "name"]
    assert named.outvars[0].aval.shape == (6, 8)


def test_no_fan_in_by_fan_out_product_in_the_train_step():
    fan_in, fan_out = 48, 40
    rng = np.random.default_rng(6)
    f = _factors(rng, (fan_in,), (fan_out,), rank=2)
    w0 = jnp.asarray(rng.normal(size=(fan_in, fan_out)).astype(np.float32))
    x = jnp.ones((4, 7, fan_in))

    def loss(f, w0):
        return jnp.sum(
            (x @ w0 + ops.dense_branch(x, f, dropout_rate=0.1, rng=jax.random.key(0))) ** 2
        )

    def shapes(jaxpr):
        """Every equation's output shape, nested jaxprs (jit, custom rules) included."""
        for eqn in jaxpr.eqns:
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from shapes(inner)
            for var in eqn.outvars:
                yield eqn.primitive.name, getattr(var.aval, "shape", ())

    closed = jax.make_jaxpr(jax.grad(loss))(f, w0)
    big = [(p, s) for p, s in shapes(closed.jaxpr) if sorted(s) == sorted((fan_in, fan_out))]
    assert big == []
    grads = jax.grad(loss)(f, w0)
    assert np.all(np.isfinite(grads.a)) and np.any(grads.a) and np.any(grads.b)


def test_compiled_gradient_equals_eager():
    rng = np.random.default_rng(7)
    f = _factors(rng, (10,), (7,))
    x = jnp.asarray(rng.normal(size=(3, 10)).astype(np.float32))

    def loss(f, x):
        return jnp.sum(jnp.sin(ops.dense_branch(x, f)))

    eager = jax.grad(loss)(f, x)
    compiled = jax.jit(jax.grad(loss))(f, x)
    # Two programs (XLA fuses the jitted one): each within round-off of float64, not bit-equal.
    # The upstream gradient cos(out) carries out's own error, at most out's magnitude (+1 for
    # cos itself), so that bounds |g| in the magnitudes.
    x64, a64, b64 = (np.asarray(t, np.float64) for t in (x, f.a, f.b))
    out = f.scale * (x64 @ a64) @ b64
    g_bound = 1.0 + f.scale * np.abs(x64) @ np.abs(a64) @ np.abs(b64)
    for grads in (eager, compiled):
        got = {"grad a": grads.a, "grad b": grads.b}
        _assert_within_roundoff(got, x64, a64, b64, f.scale, np.cos(out), g_magnitude=g_bound)
