import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import transformer_params

import jlora
from jlora import LoraConfig, NotAnArrayError, TargetError

QV = LoraConfig(targets=r".*attn/(query|value)/kernel", rank=4, alpha=8)


def test_factors_only_at_targets_with_shapes():
    params = transformer_params()
    adapters = jlora.init(jax.random.key(0), params, QV)
    assert set(adapters) == {"layers_0", "layers_1"}
    assert set(adapters["layers_0"]["attn"]) == {"query", "value"}
    f = adapters["layers_1"]["attn"]["value"]["kernel"]
    assert f.a.shape == (16, 4) and f.b.shape == (4, 16)
    assert f.scale == 2.0 and f.rank == 4 and f.a.dtype == jnp.float32
    assert not np.any(f.b)


def test_gaussian_and_kaiming_statistics():
    params = {"w": np.zeros((400, 300), np.float32)}
    g = jlora.init(jax.random.key(0), params, LoraConfig(targets="w", rank=100))["w"].a
    np.testing.assert_allclose(np.std(g), 1 / np.sqrt(400), rtol=0.02)
    np.testing.assert_allclose(np.mean(g), 0, atol=3e-3)
    k = jlora.init(
        jax.random.key(0), params, LoraConfig(targets="w", rank=100, init="kaiming_uniform")
    )["w"].a
    assert np.max(np.abs(k)) <= 1 / np.sqrt(400)
    np.testing.assert_allclose(np.std(k), 1 / np.sqrt(3 * 400), rtol=0.02)


def test_embedding_is_the_other_way_round():
    params = transformer_params()
    f = jlora.init(jax.random.key(0), params, LoraConfig(targets="embed/embedding", rank=3))
    f = f["embed"]["embedding"]
    assert f.layout.embedding
    assert f.a.shape == (11, 3) and not np.any(f.a)
    assert f.b.shape == (3, 16) and np.std(f.b) > 0.5


def test_keys_per_path_do_not_depend_on_other_targets():
    params = transformer_params()
    key = jax.random.key(7)
    only_q = jlora.init(key, params, LoraConfig(targets=".*query/kernel", rank=4))
    qv = jlora.init(key, params, QV)
    a1 = only_q["layers_0"]["attn"]["query"]["kernel"].a
    a2 = qv["layers_0"]["attn"]["query"]["kernel"].a
    # Exact, as design.md promises: per-path keys, and an element-wise draw with no sums whose
    # order another program could change.
    np.testing.assert_array_equal(a1, a2)
    a_v = qv["layers_0"]["attn"]["value"]["kernel"].a
    assert not np.allclose(a2, a_v)


@pytest.mark.parametrize("scheme", ["gaussian", "kaiming_uniform"])
def test_init_under_jit_gives_the_eager_bits(scheme):
    # Same key, same adapters however init is called: eager, or inlined into a caller's jit (a
    # draw that depends on the enclosing program, e.g. a shared flat draw sliced, fails this).
    params = {
        "dense": {"kernel": np.ones((48, 40), np.float32)},
        "emb": {"embedding": np.ones((30, 16), np.float32)},
    }
    config = LoraConfig(targets=(r".*kernel", r".*embedding"), rank=4, init=scheme)
    key = jax.random.key(3)
    eager = jlora.init(key, params, config)
    jitted = jax.jit(lambda k: jlora.init(k, params, config))(key)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.std(eager["dense"]["kernel"].a) > 0 and np.std(eager["emb"]["embedding"].b) > 0


def test_abstract_params_and_dtype():
    params = jax.eval_shape(lambda: transformer_params())
    adapters = jlora.init(
        jax.random.key(0), params, LoraConfig(targets=".*/kernel", dtype="bfloat16")
    )
    f = adapters["layers_0"]["mlp"]["up"]["kernel"]
    assert f.a.dtype == jnp.bfloat16 and f.b.shape == (8, 32)


def test_rank_pattern_and_layouts():
    params = {
        "stack": {"kernel": np.ones((3, 8, 6), np.float32)},
        "q": {"kernel": np.ones((8, 2, 4), np.float32)},
        "conv": {"kernel": np.ones((3, 3, 2, 5), np.float32)},
    }
    config = LoraConfig(
        targets=".*kernel",
        rank=2,
        rank_pattern={"conv/kernel": 4},
        layouts={"stack/kernel": "sio", "q/kernel": "ioo", "conv/kernel": "iiio"},
    )
    adapters = jlora.init(jax.random.key(0), params, config)
    s, q, c = (adapters[k]["kernel"] for k in ("stack", "q", "conv"))
    assert (s.a.shape, s.b.shape) == ((3, 8, 2), (3, 2, 6))
    assert (q.a.shape, q.b.shape) == ((8, 2), (2, 2, 4))
    assert (c.a.shape, c.b.shape) == ((3, 3, 2, 4), (4, 5))
    # Stacked layers get independent adapters.
    assert not np.allclose(s.a[0], s.a[1])


def test_target_that_matches_nothing_lists_closest_paths():
    params = transformer_params()
    with pytest.raises(
        TargetError,
        match=r"module name 'layers_0/attn/qury/kernel' names no module .* matches no parameter"
        r" path.*Closest paths: \['layers_0/attn/query/kernel'",
    ):
        jlora.init(jax.random.key(0), params, LoraConfig(targets="layers_0/attn/qury/kernel"))
    with pytest.raises(TargetError, match=r"target '.\*qury.\*' matches no parameter path"):
        jlora.init(jax.random.key(0), params, LoraConfig(targets=".*qury.*"))


def test_module_names_match_at_any_depth_and_only_weights():
    params = transformer_params()
    adapters = jlora.init(jax.random.key(0), params, LoraConfig(targets=["query", "attn/value"]))
    paths = sorted(jlora._merge.factors_by_path(adapters))
    assert paths == [f"layers_{i}/attn/{n}/kernel" for i in (0, 1) for n in ("query", "value")]
    with pytest.raises(TargetError, match=r"module name 'quer' names no module"):
        jlora.init(jax.random.key(0), params, LoraConfig(targets="quer"))


def test_exclude_everything_is_an_error():
    config = LoraConfig(targets=".*kernel", exclude=".*")
    with pytest.raises(TargetError, match="select no adaptable weight"):
        jlora.init(jax.random.key(0), transformer_params(), config)


def test_rank_too_large():
    params = {"dense": {"kernel": np.ones((6, 4), np.float32)}}
    with pytest.raises(
        TargetError,
        match=r"dense/kernel: rank 5 is larger than min\(fan_in, fan_out\)"
        r" = 4 for a weight of shape \(6, 4\)",
    ):
        jlora.init(jax.random.key(0), params, LoraConfig(targets=".*kernel", rank=5))


def test_vector_weight_is_an_error_with_a_hint():
    with pytest.raises(
        TargetError,
        match=r"layers_0/attn/query/bias: targeted a weight of shape "
        r"\(16,\) \(rank 1\).*'\.\*query/kernel'",
    ):
        jlora.init(jax.random.key(0), transformer_params(), LoraConfig(targets=".*query/.*"))


def test_non_array_leaf():
    params = {"dense": {"kernel": np.ones((4, 4), np.float32), "name": "dense"}}
    with pytest.raises(NotAnArrayError, match=r"dense/name: targeted a leaf of type str"):
        jlora.init(jax.random.key(0), params, LoraConfig(targets="dense/.*", rank=2))


def test_ambiguous_shape_needs_a_layout():
    params = {"q": {"kernel": np.ones((8, 2, 4), np.float32)}}
    with pytest.raises(
        TargetError,
        match=r"q/kernel: weight of shape \(8, 2, 4\) has 3 axes.*"
        r"layouts=",
    ):
        jlora.init(jax.random.key(0), params, LoraConfig(targets=".*kernel"))


def test_layout_with_too_many_axes():
    params = {"w": np.ones((8, 4), np.float32)}
    config = LoraConfig(targets="w", rank=1, layouts={"w": "iio"})
    with pytest.raises(TargetError, match=r"w: layout 'iio' needs at least 3 axes"):
        jlora.init(jax.random.key(0), params, config)
