import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jlora import ConfigError
from jlora.lowrank import LowRankDense, LowRankLinear, init_factors

N_IN, N_OUT, RANK = 32, 24, 8
SCHEMES = ("rank_aware", "autoencoder")
DRAWS = 4000
# A fixed input with |x|^2 = n, so a full-rank Dense with Flax's default init has E[y_j^2 | x] = 1.
X = np.random.default_rng(0).normal(size=N_IN)
X = (X * np.sqrt(N_IN) / np.linalg.norm(X)).astype(np.float32)


@pytest.fixture(scope="module")
def second_moments() -> dict[str, tuple[float, float]]:
    """For each layer: the mean over DRAWS independent initialisations of mean_j y_j^2, and its
    standard error. The draws are independent, so by the central limit theorem each sample mean
    is within 4.5 standard errors of its expectation except with probability < 1e-5."""
    layers = {"full": nn.Dense(N_OUT)}
    layers |= {s: LowRankDense(N_OUT, RANK, init_scheme=s) for s in SCHEMES}

    def sample(key):  # one program for all three layers: one compilation
        return {name: layer.apply(layer.init(key, X), X) for name, layer in layers.items()}

    ys = jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(1), DRAWS))
    out = {}
    for name, y in ys.items():
        stat = (np.asarray(y, np.float64) ** 2).mean(axis=1)
        out[name] = (float(stat.mean()), float(stat.std(ddof=1) / np.sqrt(DRAWS)))
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_variance_equals_the_full_rank_layers(scheme, second_moments):
    mean, se = second_moments[scheme]
    full_mean, full_se = second_moments["full"]
    assert abs(full_mean - 1.0) < 4.5 * full_se  # the reference itself: |x|^2 / n = 1
    assert abs(mean - 1.0) < 4.5 * se
    assert abs(mean - full_mean) < 4.5 * np.hypot(se, full_se)
    assert 4.5 * se < 0.05  # the test would catch a 5% error in the variance


def test_rank_aware_factors_are_balanced_and_exactly_rank_r():
    a, b = (np.asarray(f, np.float64) for f in init_factors(jax.random.key(0), N_IN, N_OUT, RANK))
    np.testing.assert_allclose(a.T @ a, b @ b.T, atol=1e-5)  # both are diag(c * s_top)
    gram = a.T @ a
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-5)  # orthogonal columns
    assert np.linalg.matrix_rank(a @ b, tol=1e-4) == RANK
    # |a b|_F is the Frobenius norm of a full-rank N(0, 1/n) draw: about sqrt(m)
    assert 0.8 < np.linalg.norm(a @ b) / np.sqrt(N_OUT) < 1.2


def test_autoencoder_factors_are_two_default_dense_kernels():
    key = jax.random.key(3)
    a, b = init_factors(key, N_IN, N_OUT, RANK, init_scheme="autoencoder")
    k1, k2 = jax.random.split(key)
    dense = nn.Dense(RANK).kernel_init  # Flax's default Dense kernel init: lecun_normal
    # Exact: the same initialiser on the same keys and shapes (element-wise maths, no sums).
    np.testing.assert_array_equal(a, dense(k1, (N_IN, RANK), jnp.float32))
    np.testing.assert_array_equal(b, dense(k2, (RANK, N_OUT), jnp.float32))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_linen_and_nnx_layers_compute_x_a_b_plus_bias(scheme):
    x = np.random.default_rng(1).normal(size=(3, 5, N_IN)).astype(np.float32)
    linen = LowRankDense(N_OUT, RANK, init_scheme=scheme, bias_init=nn.initializers.ones)
    params = linen.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "a": (N_IN, RANK),
        "b": (RANK, N_OUT),
        "bias": (N_OUT,),
    }
    layer = LowRankLinear(N_IN, N_OUT, RANK, init_scheme=scheme, rngs=nnx.Rngs(0))
    a, b = init_factors(nnx.Rngs(0).params(), N_IN, N_OUT, RANK, init_scheme=scheme)
    # Exact: the layer calls init_factors with this very key.
    np.testing.assert_array_equal(layer.a[...], a)
    np.testing.assert_array_equal(layer.b[...], b)
    for y, p in (
        (linen.apply({"params": params}, x), params),
        (layer(x), {"a": a, "b": b, "bias": np.zeros(N_OUT)}),
    ):
        a64, b64 = (np.asarray(p[k], np.float64) for k in ("a", "b"))
        expected = x.astype(np.float64) @ a64 @ b64 + np.asarray(p["bias"], np.float64)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dtypes_and_no_bias():
    kwargs = {"use_bias": False, "dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}
    layer = LowRankLinear(N_IN, N_OUT, RANK, rngs=nnx.Rngs(0), **kwargs)
    assert layer.bias is None and layer.a[...].dtype == jnp.bfloat16
    assert layer(jnp.ones((2, N_IN), jnp.float32)).dtype == jnp.bfloat16
    linen = LowRankDense(N_OUT, RANK, **kwargs)
    params = linen.init(jax.random.key(0), jnp.ones((1, N_IN)))["params"]
    assert sorted(params) == ["a", "b"] and params["a"].dtype == jnp.bfloat16


def test_a_low_rank_layer_learns_a_rank_r_map():
    rng = np.random.default_rng(2)
    target = rng.normal(size=(N_IN, 2)) @ rng.normal(size=(2, N_OUT)) / np.sqrt(N_IN)
    x = rng.normal(size=(256, N_IN)).astype(np.float32)
    y = (x @ target).astype(np.float32)
    layer = LowRankDense(N_OUT, 2, use_bias=False)
    params = layer.init(jax.random.key(0), x)["params"]
    tx = optax.adam(3e-2)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((layer.apply({"params": p}, x) - y) ** 2)
        )(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            updates, state = tx.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
    losses = []
    for _ in range(300):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 1e-3 * losses[0]


@pytest.mark.parametrize(
    ("rank", "scheme", "message"),
    [
        (25, "rank_aware", r"low-rank layer 32 -> 24: rank 25 is invalid; .* \[1, 24\]"),
        (0, "rank_aware", r"rank 0 is invalid"),
        (2.0, "rank_aware", r"rank 2.0 is invalid; expected an integer"),
        (
            2,
            "svd",
            r"init_scheme 'svd' is unknown; expected one of \('rank_aware', 'autoencoder'\)",
        ),
    ],
)
def test_bad_configuration(rank, scheme, message):
    with pytest.raises(ConfigError, match=message):
        init_factors(jax.random.key(0), N_IN, N_OUT, rank, init_scheme=scheme)
    with pytest.raises(ConfigError, match=message):
        LowRankLinear(N_IN, N_OUT, rank, init_scheme=scheme, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=message):
        LowRankDense(N_OUT, rank, init_scheme=scheme).init(jax.random.key(0), jnp.ones((1, N_IN)))
