"""Test-wide setup: 8 simulated CPU devices, set before jax is imported anywhere.

No persistent compilation cache here: on jax 0.10.2, XLA:CPU executables of our sharded step
that are loaded back from the persistent cache deadlock in their collectives (reproduced; see
docs/training.md). Tests that launch single-device subprocesses may still share one.
"""

import gc
import os
import subprocess
import sys

# XLA:CPU compile time dominates the suite (tiny models, many programs). These options change how
# fast XLA:CPU compiles and how fast the generated code runs, not what it computes; subprocess
# tests reuse them. LLVM at -O0 halves a compile. The legacy fusion emitters instead of the
# MLIR-based ones, and no YNNPACK fusions (the small dots go to XLA's own kernels), cut a step
# program's compile by another ~25% (float32 data x expert step: 10.1 -> 7.8 s) and three
# compile-bound test modules from 380-396 s to 293 s (DEVELOPERS.md).
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_FASTER_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_cpu_experimental_ynn_fusion_type="


def _xla_accepts(flags: str) -> bool:
    """Whether this jaxlib's XLA knows every flag: XLA aborts a process that sets an unknown one
    in XLA_FLAGS, and _FASTER_COMPILE's flags are newer and experimental (jax is not pinned)."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True).returncode == 0


FAST_COMPILE = _FAST_COMPILE
if _xla_accepts(_FASTER_COMPILE):
    FAST_COMPILE += " " + _FASTER_COMPILE

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Source locations from Python tracebacks on every op cost ~10% of lowering and ~15-20% of an
# XLA:CPU compile (the traceback walk, then carrying the locations through Shardy's HLO <->
# StableHLO round trips); no test reads them. Subprocesses that inherit the environment skip
# them too.
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "0")
os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def _memory_mappings() -> tuple[int, int] | None:
    """(mappings this process holds, the kernel's per-process limit), or None off Linux."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f), limit
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs between test modules once they hold a quarter of the map limit.

    XLA:CPU maps every executable's code into memory mappings of its own, and jax keeps each
    program it compiled. One process running the whole suite reached vm.max_map_count (65530)
    about 85% of the way through, and LLVM then aborts inside a compile (`Fatal Python error:
    Aborted` / `Segmentation fault` in backend_compile_and_load). The costliest module adds about
    26K mappings, so a quarter leaves twice that in hand; clearing only then keeps the compiles
    that later modules share (functools.cache'd steps) most of the time.
    """
    yield
    counts = _memory_mappings()
    if counts is not None and counts[0] > counts[1] // 4:
        jax.clear_caches()
        gc.collect()
