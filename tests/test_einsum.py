"""Einsum kernels in any axis order (Gemma's attention forms): functional core, Linen and NNX.

Forms: Gemma's query ``'BTD,NDH->BTNH'`` (kernel ``(heads, d_model, head_dim)``, roles ``oio``), its
stacked key/value ``'BTD,CKDH->CBTKH'`` (``ooio``), a per-head kernel ``'BTNH,NHJ->BTNJ'`` (shared
letter ``N``: ``sio``) and the output ``'BTNJ,NJD->BTD'`` (``iio``). Every check compares with a
float64 NumPy forward of the merged weights, tolerances scaled to the magnitudes summed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import jlora.linen
import jlora.nnx
from jlora import AdapterMismatchError, LoraConfig, TargetError
from jlora._einsum import parse

B, T, D, N, H, J, C, K = 2, 3, 8, 4, 5, 6, 2, 3
EINSUMS = {
    "q": ("BTD,NDH->BTNH", (N, D, H)),
    "kv": ("BTD,CKDH->CBTKH", (C, K, D, H)),
    "perhead": ("BTNH,NHJ->BTNJ", (N, H, J)),
    "out": ("BTNJ,NJD->BTD", (N, J, D)),
}


@pytest.mark.parametrize(
    ("equation", "roles"),
    [
        ("BTD,NDH->BTNH", "oio"),
        ("BTD,CKDH->CBTKH", "ooio"),
        ("BTNH,NHJ->BTNJ", "sio"),
        ("BTNH,NHD->BTD", "iio"),
        ("bd,kd->bk", "oi"),
        ("...d,dk->...k", "io"),
        ("ebd,edk->ebk", "sio"),
    ],
)
def test_roles_of_kernel_letters(equation, roles):
    assert parse(equation).roles == roles


def _forward64(weights: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """The model below in float64 NumPy, from (merged) weights."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    q = np.einsum(EINSUMS["q"][0], x, w["q"])
    kv = np.einsum(EINSUMS["kv"][0], x, w["kv"])
    per = np.einsum(EINSUMS["perhead"][0], q, w["perhead"])
    return {"out": np.einsum(EINSUMS["out"][0], per, w["out"]), "kv": kv}


def _magnitude64(weights: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """The same forward on absolute values: what each output element sums, for tolerances."""
    return _forward64({k: np.abs(np.asarray(v, np.float64)) for k, v in weights.items()}, np.abs(x))


def _assert_close(got: dict, weights: dict, x: np.ndarray) -> None:
    want, mags = _forward64(weights, x), _magnitude64(weights, x)
    eps = np.finfo(np.float32).eps
    for name in ("out", "kv"):
        # Two chained products of <= 8 terms each, one float32 rounding per op and per term.
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=32 * eps * mags[name].max())


class LinenGemma(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = {n: nn.Einsum(s, e, use_bias=False, name=n) for n, (e, s) in EINSUMS.items()}
        q = layers["q"](x)
        return {"out": layers["out"](layers["perhead"](q)), "kv": layers["kv"](x)}


class NnxGemma(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q, self.kv, self.perhead, self.out = (
            nnx.Einsum(e, s, rngs=rngs) for e, s in EINSUMS.values()
        )

    def __call__(self, x):
        return {"out": self.out(self.perhead(self.q(x))), "kv": self.kv(x)}


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, T, D)).astype(np.float32)


def _weights(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {n: (0.3 * rng.normal(size=s)).astype(np.float32) for n, (_, s) in EINSUMS.items()}


def _randomise(adapters, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(0.5 * rng.normal(size=v.shape), v.dtype), adapters)


FOLDED = {  # chosen layouts: stack C (separate k and v adapters), fold the shared head letter N
    ".*kv/kernel": "soio",
    ".*perhead/kernel": "iio",
}


@pytest.mark.parametrize("layouts", [{}, FOLDED], ids=["natural", "chosen"])
def test_functional_merge_writes_the_delta_in_kernel_order(layouts):
    weights = _weights(0)
    config = LoraConfig(targets=".*", rank=2, alpha=3.0, layouts={**layouts, **_natural()})
    adapters = _randomise(jlora.init(jax.random.key(0), weights, config), 1)
    merged = jlora.merge(weights, adapters)
    for name, (equation, shape) in EINSUMS.items():
        f = adapters[name]
        roles = f.layout.roles(len(shape))
        kernel = parse(equation).kernel
        s, i, o = ("".join(c for c, g in zip(kernel, roles, strict=True) if g == x) for x in "sio")
        delta = f.scale * np.einsum(
            f"{s}{i}r,{s}r{o}->{kernel}", np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
        )
        want = np.asarray(weights[name], np.float64) + delta
        bound = 4 * np.finfo(np.float32).eps * (np.abs(want).max() + 1)
        np.testing.assert_allclose(merged[name], want, rtol=0, atol=bound, err_msg=name)
        back = jlora.unmerge(merged, adapters)[name]
        np.testing.assert_allclose(back, weights[name], rtol=0, atol=2 * bound, err_msg=name)


def _natural():
    # The functional core needs layouts for 3+ axes; these are what the Flax transforms infer.
    return {f"{n}": parse(e).roles for n, (e, _) in EINSUMS.items()}


def _weight_shaped(jaxpr, shapes) -> list:
    found = []
    for eqn in jaxpr.eqns:
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _weight_shaped(inner, shapes)
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if sorted(shape) in [sorted(s) for s in shapes]:
                found.append((eqn.primitive.name, shape))
    return found


@pytest.mark.parametrize("layouts", [{}, FOLDED], ids=["natural", "chosen"])
def test_linen_einsums_adapt_in_factored_form(layouts):
    model = LinenGemma()
    x, weights = _x(2), _weights(3)
    params = {n: {"kernel": jnp.asarray(w)} for n, w in weights.items()}
    adapted = jlora.linen.lora(model, LoraConfig(targets=".*kernel", rank=2, layouts=layouts))
    assert adapted.infer_layouts(params, x) == {
        f"{n}/kernel": parse(e).roles if not layouts else _chosen(n, e)
        for n, (e, _) in EINSUMS.items()
    }
    adapters = adapted.init_adapters(jax.random.key(0), params, x)
    if layouts:
        assert adapters["kv"]["kernel"].a.shape == (C, D, 2)
        assert adapters["kv"]["kernel"].b.shape == (C, 2, K, H)
        assert adapters["perhead"]["kernel"].a.shape == (N, H, 2)
        assert adapters["perhead"]["kernel"].b.shape == (2, J)
    # Eager: each op is the same primitive on the same shapes in both calls, plus an exact zero.
    base = model.apply({"params": params}, x)
    at_init = adapted.apply(params, adapters, x)
    for name in base:
        np.testing.assert_array_equal(at_init[name], base[name])
    adapters = _randomise(adapters, 4)
    got = jax.jit(adapted.apply)(params, adapters, x)
    merged = jlora.merge(params, adapters)
    _assert_close(got, {n: merged[n]["kernel"] for n in weights}, x)
    # Factored vs merged to float64 round-off: the merged weights in float64.
    merged64 = {
        n: np.asarray(weights[n], np.float64) + np.asarray(jlora.delta(adapters)[n]["kernel"])
        for n in weights
    }
    _assert_close(got, merged64, x)

    def loss(adapters):
        y = adapted.apply(params, adapters, x)
        return jnp.sum(y["out"] ** 2) + jnp.sum(y["kv"] ** 2)

    grads = jax.grad(loss)(adapters)
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    found = _weight_shaped(
        jax.make_jaxpr(jax.grad(loss))(adapters).jaxpr, [s for _, s in EINSUMS.values()]
    )
    assert found == []


def _chosen(name: str, equation: str) -> str:
    return {"kv": "soio", "perhead": "iio"}.get(name, parse(equation).roles)


def test_a_chosen_layout_that_does_not_fit_the_einsum():
    model = LinenGemma()
    x, weights = _x(5), _weights(6)
    params = {n: {"kernel": jnp.asarray(w)} for n, w in weights.items()}
    config = LoraConfig(targets=".*q/kernel", rank=2, layouts={".*q/kernel": "ioo"})
    with pytest.raises(
        TargetError,
        match=r"q/kernel: einsum 'BTD,NDH->BTNH' \(natural roles 'oio'\) cannot take the layout "
        r"'ioo' from LoraConfig.layouts: kernel letter 'N' is produced \('o'\)",
    ):
        jlora.linen.lora(model, config).init_adapters(jax.random.key(0), params, x)
    dense = jlora.linen.lora(
        nn.Dense(3, use_bias=False), LoraConfig(targets="kernel", layouts={"kernel": "oi"})
    )
    with pytest.raises(TargetError, match=r"kernel: LoraConfig.layouts gives 'oi' for this weight"):
        dense.init_adapters(jax.random.key(0), {"kernel": jnp.ones((8, 3))}, x[0])


def test_linen_adapters_made_with_another_layout_are_refused():
    model = LinenGemma()
    x, weights = _x(7), _weights(8)
    params = {n: {"kernel": jnp.asarray(w)} for n, w in weights.items()}
    folded = jlora.linen.lora(model, LoraConfig(targets=".*kernel", rank=2, layouts=FOLDED))
    adapters = folded.init_adapters(jax.random.key(0), params, x)
    natural = jlora.linen.lora(model, LoraConfig(targets=".*kernel", rank=2))
    with pytest.raises(
        AdapterMismatchError,
        match=r"perhead/kernel: the adapter's layout is 'iio' but this nn.Einsum weight's is 'sio'",
    ):
        natural.apply(params, adapters, x)


@pytest.mark.parametrize("layouts", [{}, FOLDED], ids=["natural", "chosen"])
def test_nnx_einsums_adapt_in_factored_form_and_merge_to_a_plain_model(layouts):
    x = _x(9)
    model = NnxGemma(nnx.Rngs(0))
    weights = _weights(10)
    for name, w in weights.items():
        getattr(model, name).kernel[...] = jnp.asarray(w)
    base = model(x)
    config = LoraConfig(targets=".*kernel", rank=2, layouts=layouts)
    jlora.nnx.lora(model, config, rngs=nnx.Rngs(1))
    assert model.kv.lora_a.shape == ((C, D, 2) if layouts else (D, 2))
    at_init = model(x)  # eager: the base op on the same shapes, plus an exact zero
    for name in base:
        np.testing.assert_array_equal(at_init[name], base[name])
    adapters = _randomise(jlora.nnx.to_adapters(model), 11)
    jlora.nnx.set_adapters(model, adapters)
    got = nnx.jit(lambda m, x: m(x))(model, x)
    merged64 = {
        n: np.asarray(weights[n], np.float64) + np.asarray(jlora.delta(adapters)[n]["kernel"])
        for n in weights
    }
    _assert_close(got, merged64, x)
    plain = jlora.nnx.merge(model)
    assert not hasattr(plain.q, "lora_a") and type(plain.q) is nnx.Einsum
    _assert_close(plain(x), merged64, x)


def test_peft_export_flattens_einsum_kernels_into_the_torch_linear(tmp_path):
    from safetensors.numpy import load_file

    import jlora.peft

    weights = _weights(12)
    config = LoraConfig(targets=["q", "out"], rank=2, alpha=3.0, layouts=_natural())
    adapters = _randomise(jlora.init(jax.random.key(0), weights, config), 13)
    with pytest.raises(jlora.peft.PeftFormatError, match=r"out: .*'iio'.*pass flatten=True"):
        jlora.peft.save(tmp_path, adapters, config, path_to_module=str)
    jlora.peft.save(tmp_path, adapters, config, path_to_module=str, flatten=True)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, (_, shape) in EINSUMS.items():
        if name not in ("q", "out"):
            continue
        a_t = tensors[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
        b_t = tensors[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
        # torch's Linear(fan_in, fan_out): delta W^T = scale * B @ A, W = (prod(i), prod(o)).
        flat = adapters[name].scale * (b_t @ a_t).T
        layout = adapters[name].layout
        canonical = [shape[k] for k in layout.to_factor_order(len(shape))]
        n_in = layout.fan_in_ndim
        delta = flat.reshape(canonical).transpose(layout.from_factor_order(len(shape)))
        assert flat.shape == (int(np.prod(canonical[:n_in])), int(np.prod(canonical[n_in:])))
        np.testing.assert_allclose(
            delta, jlora.delta(adapters)[name], rtol=0, atol=8 * np.finfo(np.float32).eps
        )
