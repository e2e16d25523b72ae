"""Test set-up shared by tests/ and the doctests in jlora/: fake CPU devices and strict numerics."""

import os

# Must precede the first jax import: 8 fake CPU devices so sharding runs in every test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# XLA's backend (LLVM) optimisations dominate compile time on CPU (an init compiles ~10x faster
# without them). HLO passes, incl. SPMD partitioning and collective combining, still run. This is
# for speed only: different programs may differ in the last bits whatever the setting, so tests
# compare them against float64 with scaled tolerances (tests/numerics.py, design.md "Numerics
# policy") and keep bit-exact checks for the same program on the same shapes.
jax.config.update("jax_disable_most_optimizations", True)
