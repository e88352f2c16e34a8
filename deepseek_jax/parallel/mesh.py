"""The device mesh: a small fixed set of named axes, sized from ParallelConfig.

Axes, outermost first: pipe (pipeline ranks), data, fsdp, expert, tensor. The order is the
device order: `tensor` is innermost, so a tensor-parallel group (the most talkative collective)
sits on neighbouring devices, which on a multi-host job means the same host; the outer axes are
the ones that span hosts. `jax.make_mesh` orders devices by physical topology on TPU and by
process on GPU/CPU, so each process's devices form a contiguous block of the outer axes.

Every axis is `AxisType.Auto`: the train step is a GSPMD jit with explicit in/out shardings and
`with_sharding_constraint` at block boundaries, and the expert layer a `shard_map`; Explicit
axes (make_mesh's default in new JAX) would demand sharding-in-types everywhere instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

from deepseek_jax.parallel import config as config_lib

PIPE, DATA, FSDP, EXPERT, TENSOR = "pipe", "data", "fsdp", "expert", "tensor"
AXES = (PIPE, DATA, FSDP, EXPERT, TENSOR)
# Axes over which the global batch is split: each carries different tokens. `expert` is one of
# them: an expert-parallel rank holds its own tokens and exchanges them with the all-to-all.
BATCH_AXES = (DATA, FSDP, EXPERT)
AXIS_TYPES = (AxisType.Auto,) * len(AXES)

assert AXES == config_lib.AXIS_FIELDS


def describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{name}={sizes[name]}" for name in AXES)


def axis_sizes(cfg: config_lib.ParallelConfig, n_devices: int) -> dict[str, int]:
    """{axis: size} with `data=-1` resolved; the product must equal the device count."""
    sizes = cfg.sizes()
    if sizes[DATA] == -1:
        rest = math.prod(v for k, v in sizes.items() if k != DATA)
        if n_devices % rest:
            raise ValueError(
                f"parallel: {n_devices} devices are not divisible by the other mesh axes "
                f"({describe({**sizes, DATA: '-1'})}, product {rest}), so data=-1 has no size"
            )
        sizes[DATA] = n_devices // rest
    product = math.prod(sizes.values())
    if product != n_devices:
        raise ValueError(
            f"parallel: the mesh {describe(sizes)} has {product} devices, but "
            f"{n_devices} devices are present"
        )
    return sizes


def make_mesh(cfg: config_lib.ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh over all devices of all processes (or the given devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(cfg, len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in AXES), AXES, axis_types=AXIS_TYPES, devices=devices
    )


def abstract_mesh(cfg: config_lib.ParallelConfig, n_devices: int) -> AbstractMesh:
    """A device-free mesh of the same shape (sharding arithmetic for meshes we do not have)."""
    sizes = axis_sizes(cfg, n_devices)
    return AbstractMesh(tuple(sizes[a] for a in AXES), AXES, axis_types=AXIS_TYPES)


def current(mesh: Mesh | AbstractMesh) -> Mesh | AbstractMesh:
    """The mesh to name in a constraint or shard_map being traced now.

    Inside a shard_map (the pipeline's, manual over `pipe`) JAX requires the context's abstract
    mesh, which marks the manual axes; elsewhere there is no context mesh and `mesh` is used.
    """
    ctx = jax.sharding.get_abstract_mesh()
    if not ctx.empty and tuple(ctx.axis_names) == tuple(mesh.axis_names):
        return ctx
    return mesh


def sizes_of(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}
