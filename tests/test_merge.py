import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_merge_within_roundoff, assert_within_roundoff, delta_reference
from trees import random_factors, transformer_params

import jlora
from jlora import AdapterMismatchError, LoraConfig

ALL = LoraConfig(targets=(r".*/kernel", r"embed/embedding"), rank=4, alpha=6)


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def test_init_equals_base_exactly():
    params = transformer_params()
    adapters = jlora.init(jax.random.key(0), params, ALL)
    merged = jlora.merge(params, adapters)
    # Exact: b = 0 makes every product of a @ b an exact zero, and W0 + 0 is W0.
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(merged), strict=True):
        np.testing.assert_array_equal(x, y)


def test_merge_matches_float64_reference():
    params = transformer_params()
    adapters = random_factors(jlora.init(jax.random.key(0), params, ALL))
    merged = jlora.merge(params, adapters)
    for path in ("layers_1/attn/value/kernel", "layers_0/mlp/up/kernel", "embed/embedding"):
        assert_merge_within_roundoff(
            _get(merged, path), _get(params, path), _get(adapters, path), err_msg=path
        )


def test_untargeted_leaves_are_the_same_objects():
    params = transformer_params()
    adapters = jlora.init(jax.random.key(0), params, ALL)
    merged = jlora.merge(params, adapters)
    assert (
        merged["layers_0"]["attn"]["query"]["bias"] is params["layers_0"]["attn"]["query"]["bias"]
    )
    assert merged["layers_1"]["ln"]["scale"] is params["layers_1"]["ln"]["scale"]
    assert (
        merged["layers_0"]["attn"]["query"]["kernel"]
        is not params["layers_0"]["attn"]["query"]["kernel"]
    )


def test_unmerge_inverts_merge():
    params = transformer_params()
    adapters = random_factors(jlora.init(jax.random.key(0), params, ALL))
    back = jlora.unmerge(jlora.merge(params, adapters), adapters)
    deltas = dict(jlora._paths.leaves_with_paths(jlora.delta(adapters)))
    for path, w in jlora._paths.leaves_with_paths(params):
        # (W0 + d) - d with the same float32 d: two roundings of |W0| + |d| at most.
        magnitude = np.abs(w) + np.abs(np.asarray(deltas.get(path, 0.0), np.float64))
        assert_within_roundoff(_get(back, path), w, magnitude, terms=2, err_msg=path)


def test_bfloat16_merge_rounds_once_from_float32():
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), transformer_params())
    adapters = random_factors(jlora.init(jax.random.key(0), params, ALL))
    merged = jlora.merge(params, adapters)
    deltas = jlora.delta(adapters)
    w0 = params["layers_0"]["mlp"]["down"]["kernel"]
    d = deltas["layers_0"]["mlp"]["down"]["kernel"]
    # Exact: the documented rule, and merge forms it with these very ops on these shapes.
    expected = (w0.astype(jnp.float32) + d).astype(jnp.bfloat16)
    got = merged["layers_0"]["mlp"]["down"]["kernel"]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.view(jnp.uint16), expected.view(jnp.uint16))
    # Adding in bfloat16 (rounding the delta first) differs somewhere: the rule matters.
    twice = w0 + d.astype(jnp.bfloat16)
    assert np.any(np.asarray(twice.view(jnp.uint16)) != np.asarray(got.view(jnp.uint16)))


def test_stacked_layers_merge_per_layer():
    params = {
        "stack": {"kernel": np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)}
    }
    config = LoraConfig(targets=".*kernel", rank=2, layouts={".*": "sio"})
    adapters = random_factors(jlora.init(jax.random.key(0), params, config))
    merged = jlora.merge(params, adapters)["stack"]["kernel"]
    f = adapters["stack"]["kernel"]
    for layer in range(3):
        one = jlora.LoraFactors(f.a[layer], f.b[layer], f.scale, jlora.Layout(1, 1))
        assert_merge_within_roundoff(merged[layer], params["stack"]["kernel"][layer], one)


def test_delta_has_weight_shapes_in_float32():
    params = {"q": {"kernel": np.ones((8, 2, 4), jnp.bfloat16)}}
    config = LoraConfig(targets=".*kernel", rank=3, layouts={".*": "ioo"})
    adapters = random_factors(jlora.init(jax.random.key(0), params, config))
    d = jlora.delta(adapters)["q"]["kernel"]
    assert d.shape == (8, 2, 4) and d.dtype == jnp.float32
    f = adapters["q"]["kernel"]
    magnitude = delta_reference(f, absolute=True)  # rank-long sums, then the scale
    assert_within_roundoff(d, delta_reference(f), magnitude, terms=f.rank + 1)


def test_merge_under_jit_equals_eager():
    params = transformer_params()
    adapters = random_factors(jlora.init(jax.random.key(0), params, ALL))
    eager = jlora.merge(params, adapters)
    jitted = jax.jit(jlora.merge)(params, adapters)  # another program: XLA may fuse the add
    for path, f in jlora._merge.factors_by_path(adapters).items():
        w = _get(params, path)
        assert_merge_within_roundoff(_get(eager, path), w, f, err_msg=path)
        assert_merge_within_roundoff(_get(jitted, path), w, f, err_msg=path)


def test_adapters_for_another_model():
    small = transformer_params(d_model=16)
    big = transformer_params(d_model=32)
    adapters = jlora.init(jax.random.key(0), small, LoraConfig(targets=".*query/kernel", rank=2))
    with pytest.raises(
        AdapterMismatchError,
        match=r"layers_0/attn/query/kernel: adapter factors a "
        r"\(16, 2\), b \(2, 16\) do not fit the weight of shape \(32, 32\); expected "
        r"a \(32, 2\), b \(2, 32\).*another model",
    ):
        jlora.merge(big, adapters)


def test_adapter_path_missing_from_params():
    params = transformer_params(layers=2)
    adapters = jlora.init(jax.random.key(0), params, LoraConfig(targets=".*query/kernel", rank=2))
    with pytest.raises(
        AdapterMismatchError,
        match=r"layers_1/attn/query/kernel: the adapters have "
        r"factors at this path but the parameters have no such weight",
    ):
        jlora.unmerge(transformer_params(layers=1), adapters)


def test_adapter_tree_with_foreign_leaves():
    with pytest.raises(
        AdapterMismatchError, match=r"w/a: adapter tree holds a ndarray, not LoraFactors"
    ):
        jlora.merge({"w": np.ones((2, 2))}, {"w": {"a": np.ones((2, 1))}})
