"""Test-wide setup: 8 simulated CPU devices, set before jax is imported anywhere.

No persistent compilation cache here: on jax 0.10.2, XLA:CPU executables of our sharded step
that are loaded back from the persistent cache deadlock in their collectives (reproduced; see
docs/training.md). Tests that launch single-device subprocesses may still share one.
"""

import os

# XLA:CPU compile time dominates the suite (tiny models, many programs); LLVM's optimisation level
# changes how fast the generated code runs, not what it computes. Subprocess tests reuse this.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
