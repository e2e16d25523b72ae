import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import random_factors

import jlora
from jlora import AdapterMismatchError, LoraConfig, MissingRngError, ops


def _factors(shape, layout, rank=3, dtype="float32"):
    params = {"w": np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    config = LoraConfig(targets="w", rank=rank, alpha=5, layouts={"w": layout}, dtype=dtype)
    return params["w"], random_factors(jlora.init(jax.random.key(0), params, config))["w"]


def _delta64(f):
    return np.asarray(jlora.delta({"w": f})["w"], np.float64)


@pytest.mark.parametrize(
    ("shape", "layout", "x_shape", "contract"),
    [
        ((6, 5), "io", (4, 6), "bi,io->bo"),
        ((8, 2, 4), "ioo", (3, 7, 8), "bti,ihd->bthd"),
        ((2, 4, 8), "iio", (3, 7, 2, 4), "bthd,hdo->bto"),
    ],
)
def test_dense_branch_equals_merged_minus_base(shape, layout, x_shape, contract):
    _, f = _factors(shape, layout)
    x = np.random.default_rng(1).normal(size=x_shape).astype(np.float32)
    got = ops.dense_branch(jnp.asarray(x), f)
    expected = np.einsum(contract, x.astype(np.float64), _delta64(f))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID", [(1, 0), (2, 1)]])
def test_conv_branch_equals_conv_with_delta_kernel(padding):
    _, f = _factors((3, 3, 2, 5), "iiio")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 8, 2)).astype(np.float32))
    kwargs = {"strides": (2, 1), "padding": padding, "kernel_dilation": (1, 2)}
    got = ops.conv_branch(x, f, **kwargs)
    dims = ("NHWC", "HWIO", "NHWC")
    expected = jax.lax.conv_general_dilated(
        x,
        jnp.asarray(_delta64(f), jnp.float32),
        (2, 1),
        padding if isinstance(padding, str) else tuple(map(tuple, padding)),
        rhs_dilation=(1, 2),
        dimension_numbers=dims,
        precision="highest",
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_branch_keeps_extra_batch_axes():
    _, f = _factors((3, 2, 4), "iio")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 10, 2)).astype(np.float32))
    got = ops.conv_branch(x, f, padding="VALID")
    flat = ops.conv_branch(x.reshape(6, 10, 2), f, padding="VALID")
    assert got.shape == (2, 3, 8, 4)
    # Exact: conv_branch folds the batch axes into one, so both run the same convolution.
    np.testing.assert_array_equal(got.reshape(6, 8, 4), flat)


def test_lookup_and_attend_branches():
    _, f = _factors((11, 6), "vo")
    d = _delta64(f)
    ids = np.array([[0, 3, 10], [5, 5, 1]])
    np.testing.assert_allclose(ops.lookup_branch(jnp.asarray(ids), f), d[ids], rtol=1e-5, atol=1e-5)
    x = np.random.default_rng(4).normal(size=(2, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(ops.attend_branch(jnp.asarray(x), f), x @ d.T, rtol=1e-5, atol=1e-5)


def test_dropout_acts_on_the_adapter_input_only():
    _, f = _factors((50, 40), "io")
    x = jnp.asarray(np.random.default_rng(5).normal(size=(64, 50)).astype(np.float32))
    rng = jax.random.key(3)
    got = ops.dense_branch(x, f, dropout_rate=0.25, rng=rng)
    keep = np.asarray(ops.dropout(jnp.ones(x.shape), 0.25, rng)) != 0  # the mask dense_branch uses
    dropped = np.where(keep, np.asarray(x, np.float64) / 0.75, 0.0)
    np.testing.assert_allclose(got, dropped @ _delta64(f), rtol=1e-4, atol=1e-4)
    assert 0.2 < 1 - float(keep.mean()) < 0.3


def test_dropout_without_rng_is_an_error():
    _, f = _factors((5, 4), "io")
    with pytest.raises(
        MissingRngError, match=r"LoRA dropout rate is 0.1 but no PRNG key was given"
    ):
        ops.dense_branch(jnp.ones((2, 5)), f, dropout_rate=0.1)


def test_bfloat16_input_computes_in_bfloat16():
    _, f = _factors((6, 5), "io")
    x = jnp.ones((2, 6), jnp.bfloat16)
    got = ops.dense_branch(x, f)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.ones((2, 6)) @ _delta64(f), rtol=3e-2, atol=3e-2
    )


def test_bfloat16_product_rounds_once():
    # x a = [1 + 2**-9, -1] is not a bfloat16 number (it rounds to [1, -1]); accumulated in
    # float32 and rounded once at the end, (x a) b keeps the 2**-9 that a rounded x a would lose.
    a = jnp.array([[1.0, -1.0], [1.0, 0.0]], jnp.float32)
    f = jlora.LoraFactors(a, jnp.ones((2, 1), jnp.float32), 1.0, jlora.Layout(1, 1))
    x = jnp.array([[1.0, 2.0**-9]], jnp.bfloat16)
    got = ops.dense_branch(x, f)
    assert got.dtype == jnp.bfloat16
    assert float(got[0, 0]) == 2.0**-9
    assert float(ops.dense_branch(x.astype(jnp.float32), f)[0, 0]) == 2.0**-9


def test_stacked_factors_are_refused():
    _, f = _factors((3, 6, 5), "sio")
    with pytest.raises(
        AdapterMismatchError, match=r"dense_branch: factors a \(3, 6, 3\) have 1 stack axes"
    ):
        ops.dense_branch(jnp.ones((2, 6)), f)
    one_layer = jax.tree.map(lambda t: t[1], f)
    assert ops.dense_branch(jnp.ones((2, 6)), one_layer).shape == (2, 5)


def test_input_that_does_not_fit():
    _, f = _factors((6, 5), "io")
    with pytest.raises(
        AdapterMismatchError,
        match=r"input's last 1 axes \(7,\) do not match the "
        r"adapter's fan-in \(6,\)",
    ):
        ops.dense_branch(jnp.ones((2, 7)), f)


def test_gradient_flows_to_factors_only_without_a_dense_product():
    w0, f = _factors((32, 24), "io", rank=2)
    x = jnp.ones((4, 32))

    def loss(f, w0):
        return jnp.sum((x @ w0 + ops.dense_branch(x, f)) ** 2)

    # No intermediate of the weight's full shape is produced by any equation but the base matmul.
    eqns = jax.make_jaxpr(jax.grad(loss))(f, jnp.asarray(w0)).eqns
    full = [e for e in eqns if any(getattr(v.aval, "shape", None) == (32, 24) for v in e.outvars)]
    assert full == []
    grads = jax.grad(loss)(f, jnp.asarray(w0))
    assert np.any(grads.a) and np.any(grads.b)
