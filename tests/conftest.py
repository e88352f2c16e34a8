"""Test-wide setup: 8 simulated CPU devices, set before jax is imported anywhere.

A persistent compilation cache (.cache/jax-tests, git-ignored) lets tests that build the same
program through different jit objects (a resumed run, a repeated config) compile it once; XLA:CPU
compiles dominate the suite's time. Keys cover the program, options and versions, so it is safe.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"
jax.config.update("jax_compilation_cache_dir", os.environ.get("DSJ_TEST_JAX_CACHE", str(_CACHE)))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
