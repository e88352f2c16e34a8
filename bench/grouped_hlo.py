"""What XLA makes of each grouped matmul on TPU and GPU, from a deviceless compile on this machine.

    python bench/grouped_hlo.py [--tpu=v5e:2x2] [--gpu=h100] [--impls=ragged_dot,tiled,megablox]
        [--shape=8192,512,256,32] [--dtype=bfloat16] [--dump=DIR]

No accelerator is needed: jax compiles for a TPU topology through libtpu and for an H100 through
the CUDA PJRT plugin's deviceless mode (a GPU target config instead of a device), and the
optimised HLO is read back. It needs, beside jax, the two backends' compilers in the same
environment (neither is a dependency of the project; use a separate venv, at the project's jax
version):

    python -m venv /tmp/hlo && /tmp/hlo/bin/pip install -e . "jax[tpu]==$(python -c \\
        'import jax; print(jax.__version__)')"
    /tmp/hlo/bin/pip install --no-deps jax-cuda12-plugin==<same> jax-cuda12-pjrt==<same>
    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 TPU_WORKER_HOSTNAMES=localhost TPU_WORKER_ID=0 \\
        TPU_ACCELERATOR_TYPE=v5litepod-4 /tmp/hlo/bin/python bench/grouped_hlo.py

(The TPU_* variables stop libtpu from asking a GCE metadata server for the host it runs on.)
For each target and implementation, forward and forward+backward of one grouped matmul of Z rows
D -> F over E experts (group sizes as in bench/grouped_matmul.py): the custom calls, every dot
and convolution with its FLOPs from its shapes ("loop" when it sits in a while body, run once
per iteration), and the FLOPs outside loops against the dense-equivalent 2·Z·D·F per GEMM.
BENCHMARKS.md has the findings; model/grouped.py acts on them (AUTO).
"""

from __future__ import annotations

import argparse
import collections
import functools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.model import grouped

G = grouped.GroupedMatmul

# xla's GpuTargetConfigProto for an H100 SXM (the device facts XLA's own gpu_specs list), with the
# cuDNN version the ragged-dot fusion asks for.
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 22 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_TARGETS = {"h100": H100}

_DEF = re.compile(r"%?([\w.\-]+) = (\w+)\[([\d,]*)\]")
_PARAM = re.compile(r"([\w.\-]+): (\w+)\[([\d,]*)\]")
_DOT = re.compile(
    r"%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (dot|convolution)\(%?([\w.\-]+), %?([\w.\-]+)\)"
)
# what an instruction calls: fusions, loops, conditionals' branches, reductions
_CALLS = re.compile(r"(?:calls|body|condition|to_apply|_computations?)=(\{[^}]*\}|%?[\w.\-]+)")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def census(hlo: str) -> dict:
    """Custom calls, and each dot/convolution: (computation, output shape, FLOPs, in a loop)."""
    shapes, loops, comp = {}, set(), None
    for line in hlo.splitlines():
        for name, _, dims in _PARAM.findall(line) if "->" in line else ():
            shapes[name] = _dims(dims)
        m = _DEF.search(line)
        if m:
            shapes[m.group(1)] = _dims(m.group(3))
        for body in re.findall(r"body=%?([\w.\-]+)", line):
            loops.add(body)
    calls = collections.defaultdict(set)  # computation -> computations it calls
    dots = []
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            comp = head.group(1)
            continue
        for ref in _CALLS.findall(line):
            calls[comp].update(re.findall(r"[\w.\-]+", ref.replace("%", " ")))
        m = _DOT.search(line)
        if not m:
            continue
        out, lhs = _dims(m.group(3)), shapes.get(m.group(5), ())
        if m.group(4) == "dot":
            cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            k = math.prod(lhs[int(i)] for i in _dims(cd.group(1))) if cd and lhs else 0
        else:  # XLA:TPU writes (batched) dots as convolutions: the lhs feature dim contracts
            # (the windows it uses to batch select one input per output; cost_analysis agrees)
            feat = re.search(r"dim_labels=(\w+)_", line)
            k = lhs[feat.group(1).index("f")] if feat and lhs and "f" in feat.group(1) else 0
        dots.append([comp, m.group(4), out, 2 * math.prod(out) * k])
    in_loop = set()
    frontier = list(loops)
    while frontier:  # everything a loop body calls runs per iteration too
        c = frontier.pop()
        if c not in in_loop:
            in_loop.add(c)
            frontier.extend(calls.get(c, ()))
    for d in dots:
        d.append(d[0] in in_loop)
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
    return {"custom_calls": dict(targets), "dots": dots}


def program(impl: G, both: bool, platform: str):
    if impl is G.MEGABLOX:
        f = functools.partial(grouped.megablox, interpret=False)
    else:
        f = functools.partial(grouped.matmul, impl=impl)
    if not both:
        return f

    def grads(x, w, s):  # the loss's value keeps the forward GEMM alive
        def loss(x, w):
            return jnp.sum(f(x, w, s).astype(jnp.float32))

        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    return grads


def report(target: str, devices, impls, shape, dtype, dump):
    Z, D, F, E = shape
    rep = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), P())
    args = (
        jax.ShapeDtypeStruct((Z, D), dtype, sharding=rep),
        jax.ShapeDtypeStruct((E, D, F), dtype, sharding=rep),
        jax.ShapeDtypeStruct((E,), jnp.int32, sharding=rep),
    )
    print(f"\n== {target} ({devices[0].device_kind}): {Z} rows, {D} -> {F}, {E} experts, {dtype}")
    for impl in impls:
        for both in (False, True):
            name = f"{impl.value} {'fwd+bwd' if both else 'fwd'}"
            dense = 2 * Z * D * F * (3 if both else 1)
            try:
                compiled = jax.jit(program(impl, both, target)).lower(*args).compile()
                hlo, cost = compiled.as_text(), compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
            except Exception as e:  # a compiler abort is a finding too
                print(f"{name}: compile failed: {str(e).splitlines()[0][:300]}")
                continue
            if dump:
                stem = re.sub(r"\W", "_", f"{target}_{impl.value}_{'bwd' if both else 'fwd'}")
                path = pathlib.Path(dump) / f"{stem}.txt"
                path.write_text(hlo)
            c = census(hlo)
            outside = sum(d[3] for d in c["dots"] if not d[4])
            print(
                f"{name}: dot FLOPs outside loops {outside / dense:.2f}x the dense "
                f"{dense / 1e9:.2f} GFLOP; custom calls {c['custom_calls'] or 'none'}"
            )
            if cost is not None and cost.get("flops") is not None:
                print(f"    XLA cost analysis: {cost['flops'] / dense:.2f}x the dense FLOPs")
            for comp, op, out, fl, loop in sorted(c["dots"], key=lambda d: -d[3])[:4]:
                where = "loop" if loop else "once"
                print(f"    {op} -> {list(out)} {fl / 1e9:.2f} GFLOP ({where}) in {comp}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tpu", default="v5e:2x2", help="libtpu topology name ('' to skip)")
    p.add_argument("--gpu", default="h100", help=f"one of {sorted(GPU_TARGETS)} ('' to skip)")
    p.add_argument("--impls", default="ragged_dot,tiled,megablox")
    p.add_argument("--shape", default="8192,512,256,32", help="Z,D,F,E")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dump", default=None, help="directory for the optimised HLO texts")
    a = p.parse_args()
    from jax.experimental import topologies

    shape = tuple(int(v) for v in a.shape.split(","))
    impls = [G(v) for v in a.impls.split(",")]
    dtype = jnp.dtype(a.dtype)
    print(f"jax {jax.__version__}")
    if a.tpu:
        topo = topologies.get_topology_desc(topology_name=a.tpu, platform="tpu")
        report(f"tpu {a.tpu}", topo.devices, impls, shape, dtype, a.dump)
    if a.gpu:
        topo = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=GPU_TARGETS[a.gpu]
        )
        gpu_impls = [i for i in impls if i is not G.MEGABLOX]  # a TPU (Mosaic) kernel
        report(f"gpu {a.gpu}", topo.devices, gpu_impls, shape, dtype, a.dump)


if __name__ == "__main__":
    main()
