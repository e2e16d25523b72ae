"""Pins the public surface: an accidental export or removal fails here."""

import jlora


def test_top_level_surface():
    assert sorted(jlora.__all__) == [
        "AdapterMismatchError",
        "ConfigError",
        "Layout",
        "LoraConfig",
        "LoraFactors",
        "MissingRngError",
        "NotAnArrayError",
        "ParamCount",
        "TargetError",
        "count_params",
        "delta",
        "init",
        "merge",
        "ops",
        "unmerge",
    ]
    public = {name for name in dir(jlora) if not name.startswith("_")}
    assert public - set(jlora.__all__) == set()


def test_ops_surface():
    assert sorted(jlora.ops.__all__) == [
        "attend_branch",
        "conv_branch",
        "dense_branch",
        "dropout",
        "lookup_branch",
    ]
