"""jlora.serving: adapter banks, mixed-adapter batches, hot swap without recompiling."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_linen import Decoder, Expert, random_variables
from numerics import EPS32, abs_chain, assert_within_roundoff, delta_reference, f64

import jlora
import jlora.checkpoint
import jlora.linen
import jlora.peft
from jlora.serving import (
    BASE,
    STRATEGIES,
    AdapterBank,
    BankError,
    BankFactors,
    apply,
    attend_term,
    combine,
    dense_term,
    einsum_term,
    lookup_term,
    truncate,
)


def _randomize(adapters, seed, size=0.3):
    """Nonzero factors (init has b = 0, which would make every adapter the base)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(size * rng.normal(size=x.shape), x.dtype), adapters)


def _dense_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
        "v": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
    }


def _dense_adapters(params, specs):
    out = {}
    for i, (name, targets, rank, alpha) in enumerate(specs):
        config = jlora.LoraConfig(targets=targets, rank=rank, alpha=alpha)
        out[name] = _randomize(jlora.init(jax.random.key(i), params, config), seed=10 + i)
    return out


SPECS = [
    ("one", "w/kernel", 2, 4.0),
    ("two", "(w|v)/kernel", 3, 1.0),
    ("three", "v/kernel", 1, 2.0),
]


# The bank ----------------------------------------------------------------------------------------


def test_bank_pads_exactly_and_round_trips():
    params = _dense_params()
    adapters = _dense_adapters(params, SPECS)
    bank = AdapterBank.build(params, adapters, capacity=5)
    assert bank.capacity == 5 and bank.max_rank == 3
    assert bank.names == ("one", "two", "three", None, None)
    w = bank.factors["w"]["kernel"]
    assert w.a.shape == (5, 6, 3) and w.b.shape == (5, 3, 5) and w.scale.shape == (5,)
    np.testing.assert_array_equal(w.a[0, :, 2], 0)  # rank 2 padded with a zero column
    np.testing.assert_array_equal(w.b[0, 2], 0)
    np.testing.assert_array_equal(w.a[2], 0)  # "three" does not adapt w
    np.testing.assert_array_equal(w.scale, np.float32([2.0, 1.0 / 3, 0, 0, 0]))
    for slot, name in enumerate(["one", "two", "three"]):
        back = bank.adapter(slot)
        want = adapters[name]
        assert jax.tree.structure(back) == jax.tree.structure(want)
        for got, ref in zip(jax.tree.leaves(back), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(got, ref)  # data movement: exact
    assert bank.ids(["two", None]).tolist() == [1, BASE]


def test_put_and_remove_keep_shapes_and_reuse_the_compiled_forward():
    params = _dense_params()
    adapters = _dense_adapters(params, SPECS)
    bank = AdapterBank.build(params, dict(list(adapters.items())[:2]), capacity=3)
    traces = []

    @jax.jit
    def forward(factors, x, ids):
        traces.append(1)
        return dense_term(x, ids, factors["w"]["kernel"])

    x = jnp.ones((4, 6), jnp.float32)
    ids = jnp.array([0, 1, BASE, 0], jnp.int32)
    first = forward(bank.factors, x, ids)
    # Another alpha, another rank, a new name, a removal, other ids: new data, one program.
    other = jlora.LoraConfig(targets="w/kernel", rank=1, alpha=7.0)
    swapped = bank.put(0, _randomize(jlora.init(jax.random.key(5), params, other), 3), other)
    swapped = swapped.put(2, adapters["three"], name="three").remove(1)
    assert jax.tree.structure(swapped.factors) == jax.tree.structure(bank.factors)
    second = forward(swapped.factors, x, jnp.array([2, 0, 0, BASE], jnp.int32))
    assert len(traces) == 1
    assert not np.array_equal(first, second)
    rebuilt = AdapterBank.build(params, dict(list(adapters.items())[:2]), capacity=3)
    np.testing.assert_array_equal(bank.table["w/kernel"].a, rebuilt.table["w/kernel"].a)
    assert swapped.names == ("slot0", None, "three")


def test_bank_errors():
    params = _dense_params()
    adapters = _dense_adapters(params, SPECS)
    both = AdapterBank.empty(params, list(adapters.values()), capacity=2, max_rank=2)
    with pytest.raises(BankError, match="v/kernel: adapter 'two' has rank 3, above the bank's max"):
        both.put(1, adapters["two"], name="two")
    bank = AdapterBank.build(params, {"one": adapters["one"]}, capacity=2, max_rank=2)
    with pytest.raises(BankError, match="slot 2 is out of range; this bank has 2 slots"):
        bank.put(2, adapters["one"])
    with pytest.raises(BankError, match="the name 'one' is already in slot 0"):
        bank.put(1, adapters["one"], name="one")
    with pytest.raises(BankError, match=r"3 adapters \(\['one', 'two', 'three'\]\) do not fit"):
        AdapterBank.build(params, adapters, capacity=2)
    with pytest.raises(
        jlora.AdapterMismatchError, match="v/kernel: adapter 'three' adapts this path"
    ):
        bank.put(1, adapters["three"], name="three")
    other_base = {"w": {"kernel": jnp.ones((7, 5))}, "v": {"kernel": jnp.ones((5, 3))}}
    with pytest.raises(jlora.AdapterMismatchError, match=r"w/kernel: adapter factors a \(6, 2\)"):
        AdapterBank.build(other_base, {"one": adapters["one"]})
    config = jlora.LoraConfig(targets="w/kernel", rank=2, alpha=1.0)
    with pytest.raises(jlora.AdapterMismatchError, match=r"w/kernel: adapter .x. has scale 2\.0"):
        bank.put(1, adapters["one"], config, name="x")
    with pytest.raises(BankError, match="no adapter named 'nine'; the bank holds \\['one'\\]"):
        bank.ids(["nine"])
    with pytest.raises(BankError, match="example 1: adapter id 1 names an empty slot"):
        bank.check_ids(jnp.array([0, 1]))
    with pytest.raises(BankError, match="example 0: adapter id 2 is out of range"):
        bank.check_ids(jnp.array([2]))
    head = jlora.LoraConfig(targets="w/kernel", rank=2, trainable=("v",))
    with pytest.raises(jlora.AdapterMismatchError, match="v/kernel: adapter 'h' has a trainable"):
        bank.put(1, jlora.init(jax.random.key(0), params, head), name="h")


def test_bank_never_rounds_silently():
    params = _dense_params()
    one = _dense_adapters(params, SPECS[:1])["one"]
    half = AdapterBank.build(params, {"one": one}, capacity=2, dtype="bfloat16", cast=True)
    assert half.dtype == jnp.bfloat16 and half.factors["w"]["kernel"].scale.dtype == jnp.float32
    np.testing.assert_array_equal(  # cast=True: rounded once, on purpose
        half.adapter(0)["w"]["kernel"].a, one["w"]["kernel"].a.astype(jnp.bfloat16)
    )
    with pytest.raises(
        BankError,
        match="w/kernel: adapter 'x' has factor a of dtype float32, wider "
        "than the bank's bfloat16, so putting it would round it; pass cast=True",
    ):
        half.put(1, one, name="x")
    wide = jax.tree.map(lambda x: np.asarray(x, np.float64), one)  # NumPy float64, e.g. from disk
    narrow = AdapterBank.build(params, {"one": one}, capacity=2)
    with pytest.raises(BankError, match="factor a of dtype float64, wider than the bank's float32"):
        narrow.put(1, wide, name="wide")
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), one)  # narrower: exact, no cast needed
    back = narrow.put(1, low, name="low").adapter(1)["w"]["kernel"]
    np.testing.assert_array_equal(back.a, low["w"]["kernel"].a.astype(jnp.float32))
    with pytest.raises(BankError, match="dtype 'int8' is invalid; expected a floating-point"):
        AdapterBank.empty(params, one, capacity=2, max_rank=2, dtype="int8")
    with pytest.raises(BankError, match=r"no adapters given; use AdapterBank\.empty"):
        AdapterBank.build(params, {})
    assert repr(narrow) == (
        "AdapterBank(capacity=2, max_rank=2, dtype=float32, paths=1, names=('one', None))"
    )


# Functional terms ---------------------------------------------------------------------------------


def _bank_factors(rng, n, fan_in, fan_out, rank, layout=None):
    a = rng.normal(size=(n, *fan_in, rank)).astype(np.float32)
    b = rng.normal(size=(n, rank, *fan_out)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    layout = layout or jlora.Layout(len(fan_in), len(fan_out))
    return BankFactors(jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale), layout)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dense_term_per_example_equals_float64_reference(strategy):
    rng = np.random.default_rng(0)
    f = _bank_factors(rng, n=4, fan_in=(3, 2), fan_out=(5,), rank=3)
    x = rng.normal(size=(6, 7, 3, 2)).astype(np.float32)
    ids = np.array([2, BASE, 0, 3, 2, BASE], np.int32)
    got = jax.jit(lambda x, ids: dense_term(x, ids, f, strategy=strategy))(x, ids)
    assert got.shape == (6, 7, 5)
    for e, i in enumerate(ids):
        if i == BASE:
            np.testing.assert_array_equal(got[e], 0)  # an exact zero: base rows stay the base
            continue
        rows, a, b = f64(x[e]).reshape(7, 6), f64(f.a[i]).reshape(6, 3), f64(f.b[i])
        s = float(f.scale[i])
        want = s * rows @ a @ b
        magnitude = s * abs_chain(rows, a, b)
        assert_within_roundoff(got[e], want, magnitude, terms=6 + 3 + 2, err_msg=f"{e}")


def test_dense_term_bad_ids():
    rng = np.random.default_rng(1)
    f = _bank_factors(rng, n=2, fan_in=(3,), fan_out=(4,), rank=2)
    x = jnp.ones((2, 3), jnp.float32)
    with pytest.raises(BankError, match="example 1 has adapter id 2; expected -1"):
        dense_term(x, jnp.array([0, 2]), f)
    with pytest.raises(BankError, match=r"ids have shape \(3,\).*expected .* shape \(2,\)"):
        dense_term(x, jnp.array([0, 1, 1]), f)
    for strategy in STRATEGIES:  # under jit: NaN, never another adapter's term
        out = jax.jit(lambda ids, s=strategy: dense_term(x, ids, f, strategy=s))(jnp.array([5, -2]))
        assert np.isnan(out).all(), strategy


def test_lookup_attend_and_einsum_terms():
    rng = np.random.default_rng(2)
    ids = np.array([1, BASE, 0], np.int32)
    table = _bank_factors(rng, n=2, fan_in=(9,), fan_out=(4,), rank=2)
    table = BankFactors(table.a, table.b, table.scale, jlora.Layout(1, 1, embedding=True))
    tokens = rng.integers(0, 9, size=(3, 5))
    looked = lookup_term(jnp.asarray(tokens), jnp.asarray(ids), table)
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    attended = attend_term(jnp.asarray(x), jnp.asarray(ids), table)
    kernel = _bank_factors(rng, n=2, fan_in=(4,), fan_out=(2, 3), rank=2)
    mixed = einsum_term("BTD,DNH->BTNH", jnp.asarray(x), jnp.asarray(ids), kernel)
    for e, i in enumerate(ids):
        if i == BASE:
            for out in (looked, attended, mixed):
                np.testing.assert_array_equal(out[e], 0)
            continue
        s = float(table.scale[i])
        a, b = f64(table.a[i]), f64(table.b[i])
        assert_within_roundoff(looked[e], s * a[tokens[e]] @ b, s * abs_chain(a[tokens[e]], b),
                               terms=4, err_msg="lookup")  # fmt: skip
        assert_within_roundoff(attended[e], s * f64(x[e]) @ b.T @ a.T,
                               s * abs_chain(x[e], b.T, a.T), terms=8, err_msg="attend")  # fmt: skip
        s, a, b = float(kernel.scale[i]), f64(kernel.a[i]), f64(kernel.b[i]).reshape(2, 6)
        assert_within_roundoff(mixed[e].reshape(5, 6), s * f64(x[e]) @ a @ b,
                               s * abs_chain(x[e], a, b), terms=8, err_msg="einsum")  # fmt: skip


# Linen models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_bank():
    """A Linen decoder, three random adapters of it (shapes from ``jax.eval_shape``: the values are
    drawn, as the decoder's) and their bank; no init program is compiled."""
    model = Decoder()
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 13, size=(6, 7)), jnp.int32)
    params = jax.tree.map(jnp.asarray, random_variables(model, tokens)["params"])  # NumPy-drawn
    configs = {
        "all": jlora.LoraConfig(targets=".*(kernel|embedding)", rank=3, alpha=6.0),
        "attn": jlora.LoraConfig(targets=".*(query|value)/kernel", rank=2, alpha=1.0),
        "mlp": jlora.LoraConfig(targets=".*(up|down)/kernel|.*embedding", rank=4, alpha=4.0),
    }
    adapters = {
        name: _randomize(
            jax.eval_shape(
                jlora.linen.lora(model, config).init_adapters, jax.random.key(i), params, tokens
            ),
            seed=20 + i,
            size=0.2,
        )
        for i, (name, config) in enumerate(configs.items())
    }
    bank = AdapterBank.build(params, {k: (v, configs[k]) for k, v in adapters.items()}, capacity=4)
    return model, params, tokens, configs, adapters, bank


NAMES = ["all", None, "mlp", "attn", "all", None]


@pytest.fixture(scope="module")
def decoder_references(decoder_bank):
    """Per adapter name: the outputs of that adapter alone (jlora.linen) and merged (None: base)."""
    model, params, tokens, configs, adapters, bank = decoder_bank
    plain = jax.jit(lambda p: model.apply({"params": p}, tokens))  # base and merged: one program
    merge = jax.jit(jlora.merge)
    refs = {None: [plain(params)]}
    for name in configs:
        lora = jlora.linen.lora(model, configs[name])
        alone = jax.jit(lora.apply)(params, adapters[name], tokens)
        refs[name] = [alone, plain(merge(params, adapters[name]))]
    return model, params, tokens, bank, refs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decoder_mixed_batch_equals_each_adapter_alone_and_merged(strategy, decoder_references):
    model, params, tokens, bank, refs = decoder_references
    run = jax.jit(lambda p, f, ids, t: apply(model, p, f, ids, t, strategy=strategy))
    mixed = run(params, bank.factors, bank.ids(NAMES), tokens)
    base = refs[None][0]
    scale = float(jnp.abs(base).max())
    for name in set(NAMES):
        rows = np.array([e for e, n in enumerate(NAMES) if n == name])
        if name is not None:  # the adapter matters
            assert float(jnp.abs(refs[name][0] - base)[rows].max()) > 1e-2 * scale
        for want in refs[name]:
            np.testing.assert_allclose(mixed[rows], want[rows], rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{name} {strategy}")  # fmt: skip


def test_decoder_hot_swap_reuses_the_program(decoder_bank):
    model, params, tokens, _, adapters, bank = decoder_bank
    traces = []

    @jax.jit
    def run(p, f, ids, t):
        traces.append(1)
        return apply(model, p, f, ids, t)

    run(params, bank.factors, bank.ids(["all"] * 6), tokens)
    bank = bank.put(3, adapters["attn"], name="attn2").remove(0)
    run(params, bank.factors, bank.ids(["attn2", "mlp", None, "attn", "mlp", "attn2"]), tokens)
    assert len(traces) == 1


def test_einsum_model_and_eager_checks():
    model = Expert()
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 10)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    config = jlora.LoraConfig(targets=".*kernel", rank=2)
    lora = jlora.linen.lora(model, config)
    one = _randomize(lora.init_adapters(jax.random.key(1), params, x), seed=5)
    bank = AdapterBank.build(params, {"one": one}, capacity=2)
    mixed = apply(lora, params, bank, bank.ids(["one", None, "one"]), x)
    alone, base = lora.apply(params, one, x), model.apply({"params": params}, x)
    np.testing.assert_allclose(mixed[::2], alone[::2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed[1], base[1], rtol=0, atol=1e-6)
    with pytest.raises(BankError, match="example 2: adapter id 1 names an empty slot"):
        apply(model, params, bank, jnp.array([0, 0, 1]), x)
    with pytest.raises(BankError, match="example 0 has adapter id 7; expected -1"):
        apply(model, params, bank, jnp.array([7, 0, 0]), x)
    wrong = {"proj": {"kernel": jnp.ones((10, 3, 5))}, "mix": params["mix"]}
    with pytest.raises(jlora.AdapterMismatchError, match=re.escape("proj/kernel: bank factors")):
        apply(model, wrong, bank.factors, jnp.array([0, 0, 0]), x)


# Loading -----------------------------------------------------------------------------------------


def test_bank_from_checkpoints_and_peft_directories(tmp_path):
    params = _dense_params()
    adapters = _dense_adapters(params, SPECS)
    configs = {n: jlora.LoraConfig(targets=t, rank=r, alpha=al) for n, t, r, al in SPECS}
    dirs = {
        n: jlora.checkpoint.save(tmp_path / "ckpt" / n, adapters[n], configs[n], base=params)
        for n in adapters
    }
    from_ckpt = AdapterBank.from_checkpoints(params, dirs, capacity=4)
    # PEFT's layout: "default" in the directory itself, every other adapter in a subdirectory.
    root = tmp_path / "peft"
    jlora.peft.save(root, adapters["one"], configs["one"])
    for n in ("two", "three"):
        jlora.peft.save(root / n, adapters[n], configs[n])
    from_peft = AdapterBank.from_peft(params, root, capacity=4)
    assert from_ckpt.names == ("one", "two", "three", None)
    assert from_peft.names == ("default", "three", "two", None)
    built = AdapterBank.build(params, adapters, capacity=4)
    for path in ("w/kernel", "v/kernel"):
        for got, want in ((from_ckpt, [0, 1, 2]), (from_peft, [0, 2, 1])):
            ref = built.table[path]
            np.testing.assert_array_equal(got.table[path].a[:3], ref.a[np.array(want)])
            np.testing.assert_array_equal(got.table[path].b[:3], ref.b[np.array(want)])
            np.testing.assert_allclose(got.table[path].scale[:3], ref.scale[np.array(want)],
                                       rtol=EPS32)  # fmt: skip
    with pytest.raises(BankError, match="no PEFT adapter named 'four'"):
        AdapterBank.from_peft(params, root, names=["four"])


def test_apply_refuses_layer_kinds_it_cannot_mix():
    model = nn.Conv(4, (3,))
    x = jnp.ones((2, 5, 3), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    lora = jlora.linen.lora(model, jlora.LoraConfig(targets="kernel", rank=2))
    bank = AdapterBank.build(params, {"c": lora.init_adapters(jax.random.key(1), params, x)})
    with pytest.raises(jlora.AdapterMismatchError, match=r"kernel: a nn\.Conv layer; mixed"):
        apply(model, params, bank, jnp.array([0, 0]), x)


# Combination --------------------------------------------------------------------------------------


def test_combine_is_the_weighted_sum_of_deltas(tmp_path):
    params = _dense_params()
    adapters = _dense_adapters(params, SPECS)
    weights = [0.7, -1.5, 0.25]
    mixed, config = combine(list(adapters.values()), weights)
    assert mixed["w"]["kernel"].rank == 2 + 3 and mixed["v"]["kernel"].rank == 3 + 1
    got = jlora.delta(mixed)
    for path in ("w", "v"):
        want, magnitude = 0.0, 0.0
        for weight, tree in zip(weights, adapters.values(), strict=True):
            if path in tree:
                f = tree[path]["kernel"]
                want = want + weight * delta_reference(f)
                magnitude = magnitude + abs(weight) * delta_reference(f, absolute=True)
        assert_within_roundoff(got[path]["kernel"], want, magnitude, terms=8, err_msg=path)
    assert config.scale_for("w/kernel") == 1.0
    jlora.checkpoint.save(tmp_path / "mixed", mixed, config, base=params)  # a valid pair
    with pytest.raises(ValueError, match="combine: 3 adapters and 2 weights"):
        combine(list(adapters.values()), [1.0, 2.0])


def _peft_cat_and_svd(adapters, weights, rank):
    """PEFT's add_weighted_adapter "cat" and "svd" per weight, in float64 and PEFT's orientation
    (lora_A: (r, in), lora_B: (out, r), delta = B A), as peft/tuners/lora/model.py writes them."""
    out = {}
    for path in ("w/kernel", "v/kernel"):
        terms = [(w, t[path.split("/")[0]]["kernel"]) for w, t in zip(weights, adapters, strict=True)
                 if path.split("/")[0] in t]  # fmt: skip
        lora_a = [f64(f.a).T for _, f in terms]
        lora_b = [f64(f.b).T * w * f.scale for w, f in terms]  # cat: weight * scaling on B
        cat = np.concatenate(lora_b, axis=1) @ np.concatenate(lora_a, axis=0)
        # svd: valid_weights = weight * scaling, times get_delta_weight (already scaled)
        delta = sum(w * f.scale * (f.scale * f64(f.b).T @ f64(f.a).T) for w, f in terms)
        u, s, vh = np.linalg.svd(delta)
        lora_b_svd, lora_a_svd = u[:, :rank] @ np.diag(s[:rank]), vh[:rank]
        out[path] = (cat.T, (lora_b_svd @ lora_a_svd).T, np.sqrt(np.sum(s[rank:] ** 2)))
    return out


def test_combine_and_truncate_match_peft_cat_and_svd():
    params = _dense_params()
    adapters = list(_dense_adapters(params, SPECS).values())
    weights, rank = [0.7, -1.5, 0.25], 2
    peft = _peft_cat_and_svd(adapters, weights, rank)
    cat, _ = combine(adapters, weights)
    cat_delta = jlora.delta(cat)
    scales = [{p: t[p]["kernel"].scale for p in t} for t in adapters]
    twice = [w * s.get("w", s.get("v")) for w, s in zip(weights, scales, strict=True)]
    # PEFT's svd scales twice; one scale per adapter for both paths holds here only if equal:
    assert all(len(set(s.values())) == 1 for s in scales)
    short, config, errors = truncate(combine(adapters, twice)[0], rank)
    short_delta = jlora.delta(short)
    for path in ("w", "v"):
        want_cat, want_svd, want_error = peft[f"{path}/kernel"]
        np.testing.assert_allclose(cat_delta[path]["kernel"], want_cat, rtol=0,
                                   atol=30 * EPS32 * np.abs(want_cat).max())  # fmt: skip
        np.testing.assert_allclose(short_delta[path]["kernel"], want_svd, rtol=0,
                                   atol=30 * EPS32 * np.abs(want_svd).max())  # fmt: skip
        assert short[path]["kernel"].rank == rank
        np.testing.assert_allclose(errors[f"{path}/kernel"], want_error, rtol=1e-4)
        a = f64(short[path]["kernel"].a)
        np.testing.assert_allclose(a.T @ a, np.eye(rank), atol=1e-5)  # orthonormal columns
    assert config.scale_for("w/kernel") == 1.0
    exact, _, none = truncate(cat, 10)  # a rank above the delta's: exact, error 0
    assert exact["w"]["kernel"].rank == 5 and none["w/kernel"] < 1e-5
    with pytest.raises(ValueError, match="truncate: rank 0 is invalid"):
        truncate(cat, 0)
