import json
import math

import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora import ConfigError, LoraConfig


def test_defaults_and_scale():
    c = LoraConfig(targets=".*kernel")
    assert c.targets == (".*kernel",)
    assert c.scale_for("x/kernel") == 16.0 / 8
    rs = LoraConfig(targets=".*kernel", rank=16, alpha=8, use_rslora=True)
    assert rs.scale_for("x/kernel") == 8 / math.sqrt(16)


def test_patterns_first_full_match_wins():
    c = LoraConfig(
        targets=".*kernel",
        rank=4,
        alpha=4,
        rank_pattern={".*query/kernel": 2, ".*/kernel": 3},
        alpha_pattern={".*value/kernel": 1.0},
    )
    assert c.rank_for("l/query/kernel") == 2
    assert c.rank_for("l/value/kernel") == 3
    assert c.rank_for("kernel") == 4  # ".*/kernel" needs a slash: full match, not search
    assert c.alpha_for("l/value/kernel") == 1.0
    assert c.scale_for("l/value/kernel") == 1.0 / 3


def test_selects_full_match_and_exclude():
    c = LoraConfig(targets=r".*attn/\w+/kernel", exclude=".*out/kernel")
    assert c.selects("layers_0/attn/query/kernel")
    assert not c.selects("layers_0/attn/out/kernel")
    assert not c.selects("layers_0/attn/query/kernel_extra")


def test_hashable_and_json_round_trip():
    c = LoraConfig(
        targets=(".*q/kernel", ".*v/kernel"),
        rank=4,
        alpha=8.0,
        exclude=".*head.*",
        rank_pattern={".*q/kernel": 2},
        alpha_pattern={".*v/kernel": 3.0},
        dropout=0.1,
        init="kaiming_uniform",
        use_rslora=True,
        dtype="bfloat16",
        layouts={".*stack/kernel": "sio"},
    )
    hash(c)
    again = LoraConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    assert hash(again) == hash(c)


def test_unknown_keys_warn_not_fail():
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['fan_in_fan_out'\]"):
        c = LoraConfig.from_dict({"targets": ["w"], "fan_in_fan_out": True})
    assert c.targets == ("w",)


def test_from_dict_needs_targets():
    with pytest.raises(ConfigError, match="no 'targets'"):
        LoraConfig.from_dict({"rank": 2})


def test_dtype_normalised():
    import jax.numpy as jnp

    assert LoraConfig(targets="w", dtype=jnp.bfloat16).dtype == "bfloat16"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"LoraConfig.rank: rank 0 is invalid; expected an integer >= 1"),
        ({"rank": 2.5}, r"LoraConfig.rank: rank 2.5 is invalid"),
        ({"rank": True}, r"LoraConfig.rank: rank True is invalid"),
        ({"alpha": 0}, r"LoraConfig.alpha: alpha 0 is invalid; expected a finite float > 0"),
        ({"alpha": -1.0}, r"alpha -1.0 is invalid"),
        ({"alpha": float("nan")}, r"alpha nan is invalid"),
        ({"alpha": "8"}, r"alpha '8' is not a number"),
        ({"dropout": 1.0}, r"LoraConfig.dropout: 1.0 is invalid; expected a rate in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout: -0.1 is invalid"),
        ({"targets": "(unclosed"}, r"LoraConfig.targets: '\(unclosed' is not a valid regular"),
        ({"targets": ()}, r"LoraConfig.targets is empty"),
        ({"targets": 3}, r"LoraConfig.targets: got 3; expected a regular expression"),
        ({"exclude": "[bad"}, r"LoraConfig.exclude: '\[bad' is not a valid regular expression"),
        ({"rank_pattern": {".*q": 0}}, r"LoraConfig.rank_pattern\['.\*q'\]: rank 0 is invalid"),
        ({"alpha_pattern": {".*q": -2}}, r"LoraConfig.alpha_pattern\['.\*q'\]: alpha -2"),
        ({"rank_pattern": {"(": 2}}, r"LoraConfig.rank_pattern: '\(' is not a valid regular"),
        ({"init": "xavier"}, r"LoraConfig.init: 'xavier' is unknown; expected one of"),
        ({"dtype": "int32"}, r"LoraConfig.dtype: 'int32' is not a floating dtype"),
        ({"layouts": {".*": "os"}}, r"LoraConfig.layouts\['.\*'\]: layout 'os' is not a layout"),
        ({"use_rslora": 1}, r"use_rslora: 1 is not a bool"),
    ],
)
def test_invalid_fields(kwargs, match):
    kwargs = {"targets": ".*kernel", **kwargs}
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(jlora.TargetError, ValueError)
    assert issubclass(jlora.AdapterMismatchError, ValueError)
    assert issubclass(jlora.NotAnArrayError, TypeError)


def test_a_config_is_static_data_for_jax_transforms():
    params = {"w": jnp.ones((4, 3))}
    config = LoraConfig(targets="w", rank=2, alpha=4.0)
    assert jax.tree.leaves(config) == []
    abstract = jax.eval_shape(jlora.init, jax.random.key(0), params, config)
    assert abstract["w"].a.shape == (4, 2) and abstract["w"].b.shape == (2, 3)
    assert float(jax.jit(lambda c, x: x * c.scale_for("w"))(config, 1.0)) == 2.0
