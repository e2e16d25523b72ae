import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import transformer_params

import jlora
from jlora import AdapterMismatchError, Layout, LoraConfig, LoraFactors
from jlora import analysis as an


def orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return q


def rotation(rng, k):
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return q


def test_identical_orthogonal_and_rotated_subspaces():
    rng = np.random.default_rng(0)
    u = orthonormal(rng, 10, 4)
    assert an.subspace_similarity(u, u) == pytest.approx(1.0, abs=1e-12)
    rotated = u @ rotation(rng, 4)  # the same span, other basis
    assert an.subspace_similarity(u, rotated) == pytest.approx(1.0, abs=1e-12)
    assert an.grassmann_distance(u, rotated) == pytest.approx(0.0, abs=1e-12)
    assert an.grassmann_distance(u, u) == pytest.approx(0.0, abs=1e-12)
    complement = np.linalg.svd(np.eye(10) - u @ u.T)[0][:, :6]
    assert an.subspace_similarity(u, complement) == pytest.approx(0.0, abs=1e-12)
    assert an.grassmann_distance(u, complement[:, :4]) == pytest.approx(
        np.pi, abs=1e-6
    )  # 4 right angles


def test_grassmann_distance_of_known_principal_angles():
    e = np.eye(4)
    t1, t2 = 0.3, 1.1
    u1 = e[:, :2]
    u2 = np.stack(
        [np.cos(t1) * e[:, 0] + np.sin(t1) * e[:, 2], np.cos(t2) * e[:, 1] + np.sin(t2) * e[:, 3]],
        1,
    )
    assert an.grassmann_distance(u1, u2) == pytest.approx(np.hypot(t1, t2), abs=1e-9)
    expected_phi = (np.cos(t1) ** 2 + np.cos(t2) ** 2) / 2
    assert an.subspace_similarity(u1, u2) == pytest.approx(expected_phi, abs=1e-12)


def test_grassmann_distance_matches_scipy_at_both_ends():
    from scipy.linalg import subspace_angles

    rng = np.random.default_rng(4)
    for n, i, j in ((30, 8, 8), (30, 3, 7), (12, 6, 2), (128, 8, 8)):
        u1, u2 = orthonormal(rng, n, i), orthonormal(rng, n, j)
        expected = np.sqrt(np.sum(subspace_angles(u1, u2) ** 2))
        assert an.grassmann_distance(u1, u2) == pytest.approx(expected, abs=1e-12)
        assert an.grassmann_distance(u2, u1) == pytest.approx(expected, abs=1e-12)
        # Nearly identical spans: tiny angles, where arccos of the cosines loses half the digits.
        tilted = np.linalg.qr(u1 + 1e-9 * rng.normal(size=u1.shape))[0]
        expected = np.sqrt(np.sum(subspace_angles(u1, tilted) ** 2))
        assert expected < 1e-7
        assert an.grassmann_distance(u1, tilted) == pytest.approx(expected, rel=1e-4, abs=1e-15)


def test_non_orthonormal_bases_are_refused():
    ones = np.ones((4, 1))
    match = r"u1: the 1 columns of this \(4, 1\) array are not orthonormal \(max \|U\^T U - I\| = 3"
    for f in (an.subspace_similarity, an.subspace_similarity_grid, an.grassmann_distance):
        with pytest.raises(ValueError, match=match):
            f(ones, ones)
        with pytest.raises(ValueError, match=r"u2: .* not orthonormal.*np.linalg.qr\(x\)\[0\]"):
            f(np.eye(4)[:, :1], 2 * np.eye(4)[:, :2])
    # After QR the same input is a valid basis, and phi is back in [0, 1].
    q = np.linalg.qr(ones)[0]
    assert an.subspace_similarity(q, q) == pytest.approx(1.0, abs=1e-12)


def test_float32_orthonormal_bases_are_accepted():
    rng = np.random.default_rng(5)
    u = np.linalg.svd(rng.normal(size=(512, 64)).astype(np.float32), full_matrices=False)[0]
    assert u.dtype == np.float32
    assert an.subspace_similarity(u, u) == pytest.approx(1.0, abs=1e-5)


def test_singular_basis_of_an_untrained_adapter_warns():
    rng = np.random.default_rng(6)
    a = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    f = LoraFactors(a, jnp.zeros((3, 5)), 1.0, Layout(1, 1))
    with pytest.warns(
        an.DegenerateBasisWarning,
        match=r"3 of the 3 output-side directions .* \(b = 0: an untrained",
    ):
        an.singular_basis(f, "output")
    assert an.singular_basis(f, "input").shape == (8, 3)  # a is random: no warning
    rank_one = LoraFactors(a, jnp.asarray(np.outer([1.0, 2.0, 0.0], rng.normal(size=5)),
                                          jnp.float32), 1.0, Layout(1, 1))  # fmt: skip
    assert an.singular_basis(rank_one, "output", k=1).shape == (5, 1)
    with pytest.warns(an.DegenerateBasisWarning, match=r"2 of the 3 output-side .* in b, so"):
        an.singular_basis(rank_one, "output")


def test_grid_matches_the_definition():
    rng = np.random.default_rng(1)
    u1, u2 = orthonormal(rng, 12, 5), orthonormal(rng, 12, 3)
    grid = an.subspace_similarity_grid(u1, u2)
    assert grid.shape == (5, 3)
    for i in range(1, 6):
        for j in range(1, 4):
            expected = np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
            assert grid[i - 1, j - 1] == pytest.approx(expected, abs=1e-12)
    assert np.all((grid >= 0) & (grid <= 1 + 1e-12))


def test_singular_basis_orientation():
    # a's column space (input side) is span(e0, e1); b's row space (output side) is span(e3).
    a = np.zeros((6, 2))
    a[0, 0], a[1, 1] = 1.0, 4.0
    b = np.zeros((2, 5))
    b[0, 3], b[1, 3] = 2.0, -1.0
    f = LoraFactors(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 1.0, Layout(1, 1))
    u_in = an.singular_basis(f, "input")
    assert u_in.shape == (6, 2)
    np.testing.assert_allclose(np.abs(u_in[:, 0]), np.eye(6)[1], atol=1e-7)  # largest first
    assert an.subspace_similarity(u_in, np.eye(6)[:, :2]) == pytest.approx(1.0)
    u_out = an.singular_basis(f, "output", k=1)
    np.testing.assert_allclose(np.abs(u_out[:, 0]), np.eye(5)[3], atol=1e-7)


def test_singular_basis_errors():
    f = LoraFactors(jnp.ones((2, 6, 3)), jnp.ones((2, 3, 4)), 1.0, Layout(1, 1))
    with pytest.raises(AdapterMismatchError, match=r"have stack axes; pass one layer's slice"):
        an.singular_basis(f)
    one = jax.tree.map(lambda t: t[0], f)
    with pytest.raises(ValueError, match=r"k=4 is outside \[1, rank=3\]"):
        an.singular_basis(one, k=4)
    with pytest.raises(ValueError, match=r"side='left'; expected 'input' or 'output'"):
        an.singular_basis(one, "left")
    with pytest.raises(ValueError, match=r"bases live in different spaces: u1 has 6 rows, u2 4"):
        an.subspace_similarity(np.eye(6)[:, :2], np.eye(4)[:, :2])


def test_update_projection_known_amplification():
    # W has a large component along (e0, e0) and a small one along the update's direction (e2, e1).
    w = np.zeros((4, 3))
    w[0, 0], w[2, 1] = 10.0, 0.5
    d = np.zeros((4, 3))
    d[2, 1] = 3.0
    p = an.update_projection(w, d, rank=1)
    assert p.delta_norm == pytest.approx(3.0)
    assert p.onto_delta == pytest.approx(0.5)
    assert p.amplification == pytest.approx(6.0)
    assert p.onto_weight == pytest.approx(10.0)
    assert p.weight_norm == pytest.approx(np.hypot(10.0, 0.5))
    again = an.update_projection(w, d, rank=1)
    assert again.onto_random == p.onto_random  # seeded
    with pytest.raises(ValueError, match=r"rank=4 is outside \[1, 3\]"):
        an.update_projection(w, d, rank=4)
    with pytest.raises(ValueError, match=r"weight \(4, 3\) and delta \(3, 4\) differ in shape"):
        an.update_projection(w, d.T, rank=1)


def test_update_projection_of_a_real_adapter_is_invariant_to_refactoring():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(16, 12))
    a, b = rng.normal(size=(16, 2)), rng.normal(size=(2, 12))
    q = rotation(rng, 2)
    p1 = an.update_projection(w, a @ b, rank=2)
    p2 = an.update_projection(w, (a @ q) @ (q.T @ b), rank=2)  # same delta, other factors
    assert p1.onto_delta == pytest.approx(p2.onto_delta, rel=1e-9)


def test_lora_count_matches_the_real_tree():
    layers, d_model, r = 3, 16, 4
    params = transformer_params(layers=layers, d_model=d_model)
    adapters = jlora.init(
        jax.random.key(0), params, LoraConfig(targets=r".*(query|value)/kernel", rank=r)
    )
    assert jlora.count_params(params, adapters).trainable == an.lora_param_count(
        2 * layers, d_model, r
    )


def test_adapter_tuning_count_matches_a_built_tree():
    d, r, n_adapters, n_ln = 16, 4, 6, 12
    tree = {
        f"adapter_{i}": {
            "down": np.zeros((d, r)),
            "down_bias": np.zeros(r),
            "up": np.zeros((r, d)),
            "up_bias": np.zeros(d),
        }
        for i in range(n_adapters)
    } | {f"ln_{i}": {"scale": np.zeros(d), "bias": np.zeros(d)} for i in range(n_ln)}
    assert sum(x.size for x in jax.tree.leaves(tree)) == an.adapter_tuning_param_count(
        n_adapters, d, r, n_ln
    )


def test_plot_writes_an_image(tmp_path):
    import matplotlib.image

    rng = np.random.default_rng(3)
    grid = an.subspace_similarity_grid(orthonormal(rng, 8, 4), orthonormal(rng, 8, 6))
    out = an.plot_subspace_similarity(grid, str(tmp_path / "phi.png"), title="A_r=4 vs A_r=6")
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 50
