"""Sharding in types: jlora under a mesh with explicit axes, with auto axes, and with no mesh.

Under ``AxisType.Explicit`` every array's type carries its sharding and jax refuses products whose
output sharding it cannot infer (a row-parallel ``x a`` contracts two split axes; an FSDP
``(x a) b`` would put the data axis on two output axes). The functional core, ``jlora.ops`` and a
Linen decoder sharded FSDP x tensor-parallel must run there, equal the unsharded computation to
round-off, and keep every factor on its derived sharding through a jitted optax step.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import (
    EPS32,
    abs_chain,
    assert_merge_within_roundoff,
    assert_same_adam_trajectory,
    assert_within_roundoff,
    delta_reference,
    f64,
)
from trees import random_factors

import jlora
import jlora.linen
from jlora import LoraConfig, LoraFactors, ops
from jlora import sharding as lsh

AxisType = getattr(jax.sharding, "AxisType", None)
set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
pytestmark = pytest.mark.skipif(
    AxisType is None or set_mesh is None or not hasattr(jax, "typeof"),
    reason="this jax has no sharding in types (AxisType, jax.set_mesh, jax.typeof)",
)
AXES = ("data", "model")


def make_mesh(mode: str) -> Mesh:
    """A 2 x 4 mesh: ``explicit`` or ``auto`` axes (``jax.make_mesh``), or a plain ``Mesh``."""
    devices = jax.devices()[:8]
    if mode == "none":
        return Mesh(np.array(devices).reshape(2, 4), AXES)
    kind = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    return jax.make_mesh((2, 4), AXES, axis_types=(kind,) * 2, devices=devices)


@contextlib.contextmanager
def active(mode: str):
    """The mesh, activated with ``jax.set_mesh`` unless ``mode`` is ``none``."""
    mesh = make_mesh(mode)
    if mode == "none":
        yield mesh
        return
    with set_mesh(mesh):
        yield mesh


def spec_of(x) -> tuple:
    """``x``'s PartitionSpec entries, one per axis: from its type under explicit axes."""
    sharding = jax.typeof(x).sharding if jax.typeof(x).sharding.mesh.explicit_axes else x.sharding
    spec = tuple(sharding.spec)
    return (*spec, *(None,) * (x.ndim - len(spec)))


def padded(spec: P, ndim: int) -> tuple:
    return (*tuple(spec), *(None,) * (ndim - len(spec)))


# The functional core: init, merge, unmerge, delta -------------------------------------------------

CORE_SPECS = {
    "fsdp_tp": P("data", "model"),  # (16, 8): column-parallel over model, FSDP over data
    "row": P("model", "data"),  # (8, 16): row-parallel
    "stack": P(None, "data", "model", None),  # (3, 16, 4, 2), "sioo": stacked query kernels
    "out": P("model", None, "data"),  # (4, 2, 16), "iio": an attention output projection
}
CORE_SHAPES = {"fsdp_tp": (16, 8), "row": (8, 16), "stack": (3, 16, 4, 2), "out": (4, 2, 16)}
CORE_CONFIG = LoraConfig(
    targets=tuple(CORE_SPECS), rank=2, alpha=3.0, layouts={"stack": "sioo", "out": "iio"}
)


@pytest.mark.parametrize("mode", ["explicit", "auto", "none"])
def test_init_merge_unmerge_delta_under_each_mesh_mode(mode):
    rng = np.random.default_rng(0)
    params = {p: rng.normal(size=s).astype(np.float32) for p, s in CORE_SHAPES.items()}
    key = jax.random.key(0)
    plain = jlora.init(key, params, CORE_CONFIG)  # no mesh
    trained = random_factors(plain, seed=1)
    with active(mode) as mesh:
        shardings = {p: NamedSharding(mesh, s) for p, s in CORE_SPECS.items()}
        sharded = jax.device_put(params, shardings)
        adapters = lsh.init(key, sharded, CORE_CONFIG)
        unsharded = jlora.init(key, params, CORE_CONFIG)
        derived = lsh.factor_shardings(adapters, shardings)
        factors = jax.device_put(trained, derived)
        merged = jlora.merge(sharded, factors)
        merged_jit = jax.jit(jlora.merge)(sharded, factors)
        back = jlora.unmerge(merged, factors)
        back_jit = jax.jit(jlora.unmerge)(merged_jit, factors)
        deltas = jlora.delta(factors)
        deltas_jit = jax.jit(jlora.delta)(factors)
    # Exact, as design.md promises: sharded and unsharded init are one jitted draw, element-wise.
    for got, want in zip(jax.tree.leaves(adapters), jax.tree.leaves(unsharded), strict=True):
        np.testing.assert_array_equal(got, want)
    # Under an explicit mesh, jit compiles every draw (sharded or not) as an 8-partition program
    # with sharding constraints: another program than the draw with no mesh, whose erfinv may
    # round differently in the last bits. Elsewhere it is the same program.
    for got, want in zip(jax.tree.leaves(unsharded), jax.tree.leaves(plain), strict=True):
        if mode == "explicit":
            np.testing.assert_allclose(got, want, rtol=8 * EPS32, atol=0)
        else:
            np.testing.assert_array_equal(got, want)
    # Created on the derived shardings (in the type, under explicit axes).
    for got, want in zip(jax.tree.leaves(adapters), jax.tree.leaves(derived), strict=True):
        assert spec_of(got) == padded(want.spec, got.ndim)
    for path, f in jlora._merge.factors_by_path(trained).items():
        w = params[path]
        for m in (merged[path], merged_jit[path]):
            assert_merge_within_roundoff(m, w, f, err_msg=f"{mode} {path}")
        assert spec_of(merged[path]) == padded(CORE_SPECS[path], w.ndim)
        if mode == "explicit":
            assert spec_of(merged_jit[path]) == padded(CORE_SPECS[path], w.ndim)
        magnitude = np.abs(f64(w)) + 2 * delta_reference(f, absolute=True)
        for b in (back[path], back_jit[path]):
            assert_within_roundoff(b, w, magnitude, terms=2 * (f.rank + 2), err_msg=path)
        for d in (deltas[path], deltas_jit[path]):
            assert_within_roundoff(
                d, delta_reference(f), delta_reference(f, absolute=True), terms=f.rank + 1
            )


# jlora.ops: each product names its output sharding -----------------------------------------------


def _put(x, mesh, spec):
    return jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))


# (weight shape, layout, weight spec, input shape, input spec, output spec under explicit axes)
DENSE_CASES = {
    "fsdp_tp": ((16, 8), "io", P("data", "model"), (6, 5, 16), P("data"), P("data", None, "model")),
    # The fan-in is split over model on both sides: x a must name its (rank-sized) output.
    "row": ((8, 16), "io", P("model", "data"), (6, 5, 8), P("data", None, "model"), P("data")),
    "heads_in": (
        (4, 2, 16),
        "iio",
        P("model", None, "data"),
        (6, 5, 4, 2),
        P("data", None, "model"),
        P("data"),
    ),
    "heads_out": (
        (16, 4, 2),
        "ioo",
        P("data", "model"),
        (6, 5, 16),
        P("data"),
        P("data", None, "model"),
    ),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_dense_branch_under_explicit_axes(case, jit):
    shape, layout, w_spec, x_shape, x_spec, out_spec = DENSE_CASES[case]
    rng = np.random.default_rng(2)
    params = {"w": np.zeros(shape, np.float32)}
    config = LoraConfig(targets="w", rank=3, alpha=5.0, layouts={"w": layout})
    f = random_factors(jlora.init(jax.random.key(0), params, config), seed=3)["w"]
    x = rng.normal(size=x_shape).astype(np.float32)
    specs = lsh.factor_specs({"w": f}, {"w": w_spec})["w"]
    fn = jax.jit(ops.dense_branch) if jit else ops.dense_branch
    with active("explicit") as mesh:
        sharded = LoraFactors(_put(f.a, mesh, specs.a), _put(f.b, mesh, specs.b), f.scale, f.layout)
        out = fn(_put(x, mesh, x_spec), sharded)
    assert spec_of(out) == padded(out_spec, out.ndim)
    n_in = f.layout.fan_in_ndim
    x2 = x.reshape(30, -1)
    a2, b2 = np.asarray(f.a).reshape(-1, 3), np.asarray(f.b).reshape(3, -1)
    want = (f.scale * f64(x2) @ f64(a2) @ f64(b2)).reshape(out.shape)
    magnitude = (f.scale * abs_chain(x2, a2, b2)).reshape(out.shape)
    terms = int(np.prod(x_shape[-n_in:])) + 3 + 2
    assert_within_roundoff(out, want, magnitude, terms=terms, err_msg=case)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_lookup_attend_and_conv_under_explicit_axes(jit):
    rng = np.random.default_rng(4)
    table = LoraFactors(
        rng.normal(size=(12, 3)).astype(np.float32),
        rng.normal(size=(3, 16)).astype(np.float32),
        0.5,
        jlora.Layout(1, 1, embedding=True),
    )
    ids = rng.integers(0, 12, size=(6, 5)).astype(np.int32)
    x = rng.normal(size=(6, 5, 16)).astype(np.float32)
    conv = LoraFactors(
        rng.normal(size=(3, 3, 4, 2)).astype(np.float32),
        rng.normal(size=(2, 8)).astype(np.float32),
        1.5,
        jlora.Layout(3, 1),
    )
    images = rng.normal(size=(2, 7, 7, 4)).astype(np.float32)
    maybe_jit = jax.jit if jit else (lambda fn: fn)
    with active("explicit") as mesh:
        # Vocab-parallel table and split ids (jnp.take cannot lay out the gather itself); the
        # attend product contracts the model-split features on both sides.
        sharded = LoraFactors(
            _put(table.a, mesh, P("model", None)),
            _put(table.b, mesh, P(None, "model")),
            table.scale,
            table.layout,
        )
        looked = maybe_jit(ops.lookup_branch)(_put(ids, mesh, P("data")), sharded)
        attended = maybe_jit(ops.attend_branch)(_put(x, mesh, P("data", None, "model")), sharded)
        conv_sharded = LoraFactors(
            _put(conv.a, mesh, P(None, None, "model", None)),
            _put(conv.b, mesh, P(None, "model")),
            conv.scale,
            conv.layout,
        )
        fn = maybe_jit(functools.partial(ops.conv_branch, padding="VALID"))
        convolved = fn(_put(images, mesh, P("data", None, None, "model")), conv_sharded)
    assert spec_of(looked) == ("data", None, "model")
    assert spec_of(attended) == ("data", None, "model")
    assert spec_of(convolved) == ("data", None, None, "model")
    a, b = f64(table.a), f64(table.b)
    assert_within_roundoff(
        looked, table.scale * a[ids] @ b, table.scale * np.abs(a[ids]) @ np.abs(b), terms=3 + 2
    )
    assert_within_roundoff(
        attended,
        table.scale * f64(x) @ b.T @ a.T,
        table.scale * abs_chain(x, b.T, a.T),
        terms=16 + 3 + 2,
    )
    # The unsharded conv of the absolute values bounds each sum's magnitude (a float32 estimate,
    # off by round-off only); both results are float32, so both roundings count.
    plain = ops.conv_branch(images, conv, padding="VALID")
    magnitude = ops.conv_branch(np.abs(images), jax.tree.map(np.abs, conv), padding="VALID").astype(
        np.float32
    )
    assert_within_roundoff(convolved, f64(plain), magnitude, terms=2 * (3 * 3 * 4 + 2 + 2))


# A Linen decoder written for explicit axes, FSDP x tensor-parallel, and its LoRA train step --------


def _explicit(x) -> bool:
    return bool(jax.typeof(x).sharding.mesh.explicit_axes)


def row_parallel(x, kernel, dims, precision=None, preferred_element_type=None):
    """A row-parallel layer's product under explicit axes: partial sums all-reduced, rows split."""
    out = P("data") if _explicit(x) else None
    return jax.lax.dot_general(
        x, kernel, dims, precision, preferred_element_type=preferred_element_type, out_sharding=out
    )


class Block(nn.Module):
    heads: int
    head_dim: int
    d_ff: int

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (
            nn.DenseGeneral((self.heads, self.head_dim), name=name)(h)
            for name in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(self.head_dim))
        t = x.shape[-2]
        weights = nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9))
        o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), dot_general=row_parallel, name="out")
        x = x + out(o)
        h = nn.gelu(nn.Dense(self.d_ff, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(x.shape[-1], dot_general=row_parallel, name="down")(h), None


class Decoder(nn.Module):
    """Embedding, ``nn.scan`` over blocks, a Dense head: runs under explicit axes as it is."""

    vocab: int = 12
    d_model: int = 16
    heads: int = 4
    head_dim: int = 2
    d_ff: int = 24
    layers: int = 2

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        if _explicit(ids):  # nn.Embed's jnp.take cannot gather with split ids: look up whole
            x = jax.sharding.reshard(embed(jax.sharding.reshard(ids, P())), P("data"))
        else:
            x = embed(ids)
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        x, _ = stack(self.heads, self.head_dim, self.d_ff, name="layers")(x, None)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


MODEL = Decoder()
SPECS = {  # FSDP over data, Megatron over model; everything else replicated
    "head/kernel": P("data", "model"),
    "head/bias": P("model"),
    "layers/query/kernel": P(None, "data", "model", None),
    "layers/value/kernel": P(None, "data", "model", None),
    "layers/key/kernel": P(None, "data", "model", None),
    "layers/out/kernel": P(None, "model", None, "data"),
    "layers/up/kernel": P(None, "data", "model"),
    "layers/up/bias": P(None, "model"),
    "layers/down/kernel": P(None, "model", "data"),
}
LAYOUTS = {
    "embed/embedding": "vo",
    "layers/query/kernel": "sioo",
    "layers/value/kernel": "sioo",
    "layers/out/kernel": "siio",
    "layers/up/kernel": "sio",
    "layers/down/kernel": "sio",
    "head/kernel": "io",
}
CONFIG = LoraConfig(targets=tuple(LAYOUTS), rank=3, alpha=6.0, layouts=LAYOUTS)
ADAPTED = jlora.linen.lora(MODEL, CONFIG)
LR, STEPS, BATCH, SEQ = 1e-2, 2, 6, 5


def _loss(adapters, params, x, y):
    logits = ADAPTED.apply(params, adapters, x)
    # One-hot, not take_along_axis: a gather of vocab-split logits needs its output named.
    labels = jax.nn.one_hot(y, MODEL.vocab, dtype=logits.dtype)
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))


def _step(tx, out_shardings=None):
    def step(adapters, opt_state, params, x, y):
        loss, grads = jax.value_and_grad(_loss)(adapters, params, x, y)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
            updates, opt_state = tx.update(grads, opt_state, adapters)
            adapters = optax.apply_updates(adapters, updates)
        return adapters, opt_state, loss

    return jax.jit(step) if out_shardings is None else jax.jit(step, out_shardings=out_shardings)


def _train(adapters, params, x, y, *, pin: bool = False):
    """``STEPS`` Adam steps; ``pin`` names the step's output shardings (auto axes leave them to
    the compiler, explicit axes carry them in the types)."""
    tx = optax.adam(LR)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(adapters)
    shardings = jax.tree.map(lambda v: v.sharding, (adapters, opt_state, x[0, 0])) if pin else None
    step, losses = _step(tx, shardings), []
    for _ in range(STEPS):
        adapters, opt_state, loss = step(adapters, opt_state, params, x, y)
        losses.append(float(loss))
    return adapters, np.array(losses)


@functools.cache
def _reference():
    """Params, batch, random starting adapters, and the unsharded run (no mesh)."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, MODEL.vocab, size=(BATCH, SEQ + 1)).astype(np.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    abstract = jax.eval_shape(MODEL.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), abstract)
    start = random_factors(jlora.init(jax.random.key(1), params, CONFIG), seed=6)
    start = jax.tree.map(lambda v: 0.3 * v, start)
    logits = jax.jit(ADAPTED.apply)(params, start, x)
    return params, (x, y), start, logits, _train(start, params, x, y)


def _specs(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: SPECS.get(jlora._paths.path_to_str(path), P()), params
    )


@pytest.mark.parametrize(
    "mode",
    # Slow only: auto axes run the sharded step of tests/test_sharded_step.py under jax.set_mesh;
    # the explicit step's fast twins are test_dense_branch_under_explicit_axes[fsdp_tp-jit] (the
    # layer) and tests/test_nnx_sharding.py's explicit optimizer step (the whole step).
    [pytest.param(m, marks=pytest.mark.slow) for m in ("explicit", "auto")],
)
def test_linen_lora_step_on_an_fsdp_tp_decoder(mode):
    params, (x, y), start, want_logits, (want, want_losses) = _reference()
    with active(mode) as mesh:
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs(params))
        sharded = jax.device_put(params, shardings)
        derived = lsh.factor_shardings(start, shardings)
        adapters = jax.device_put(start, derived)
        on_rows = NamedSharding(mesh, P("data"))
        xs, ys = jax.device_put(x, on_rows), jax.device_put(y, on_rows)
        logits = jax.jit(ADAPTED.apply)(sharded, adapters, xs)
        got, losses = _train(adapters, sharded, xs, ys, pin=mode == "auto")
    # The decoder's output: whole models have no float64 twin; 1e-5 of the output's scale.
    np.testing.assert_allclose(logits, want_logits, atol=1e-5 * float(np.abs(want_logits).max()))
    np.testing.assert_allclose(losses, want_losses, rtol=BATCH * SEQ * EPS32)
    for g, w, s, d in zip(
        jax.tree.leaves(got),
        jax.tree.leaves(want),
        jax.tree.leaves(start),
        jax.tree.leaves(derived),
        strict=True,
    ):
        assert_same_adam_trajectory(g, w, s, lr=LR, steps=STEPS)
        if mode == "explicit":  # the jitted step's outputs are typed with the derived shardings
            assert spec_of(g) == padded(d.spec, g.ndim)
        else:
            assert g.sharding.is_equivalent_to(d, g.ndim)
    out = got["layers"]["out"]["kernel"]
    assert spec_of(out.a) == (None, "model", None, None)  # row-parallel: a split like the fan-in
    assert spec_of(out.b) == (None, None, "data")  # FSDP: b split like the fan-out
