"""Start training from the parameters of another checkpoint (e.g. a `convert from-hf` output).

Only params and expert biases are taken; the optimizer starts fresh at step 0. The source's model
config must describe the same architecture (dtypes, remat and init may differ); MTP modules absent
from the source (an HF checkpoint without MTP layers) keep their fresh initialisation.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import numpy as np

from deepseek_jax.convert import ckpt_io, mapping
from deepseek_jax.model import config as config_lib
from deepseek_jax.train import state as state_lib

log = logging.getLogger(__name__)

_FREE_FIELDS = (
    "param_dtype",
    "compute_dtype",
    "remat",
    "scan_layers",
    "attention",
    "grouped_matmul",
    "matmul_policy",
    "loss_chunk_tokens",
    "init_std",
    "mtp_depth",
)


def check_architecture(
    source: config_lib.ModelConfig, target: config_lib.ModelConfig, where: pathlib.Path
) -> None:
    diffs = [
        f"{f.name}: checkpoint {getattr(source, f.name)!r} vs config {getattr(target, f.name)!r}"
        for f in dataclasses.fields(config_lib.ModelConfig)
        if f.name not in _FREE_FIELDS and getattr(source, f.name) != getattr(target, f.name)
    ]
    if diffs:
        raise ValueError(
            f"checkpoint.init_from={where}: its model differs from model.*: " + "; ".join(diffs)
        )


def load_into(
    state: state_lib.TrainState, cfg: config_lib.ModelConfig, source: str
) -> state_lib.TrainState:
    step_dir = ckpt_io.resolve_step_dir(pathlib.Path(source))
    check_architecture(ckpt_io.model_config(step_dir), cfg, step_dir)
    reader = ckpt_io.StateReader(step_dir)
    want = mapping.model_leaves(cfg)
    reader.check(want, allow_missing=("mtp",))
    missing = [p for p in want["params"] if p not in reader.leaves["params"]]
    if missing:
        log.warning(
            "%s has no MTP parameters: %d MTP leaves keep their initialisation",
            step_dir,
            len(missing),
        )

    def fill(collection: str, tree):
        flat = {
            tuple(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        }
        new = {}
        for path, leaf in flat.items():
            if path in reader.leaves[collection]:
                value = np.asarray(reader.read(collection, path), leaf.dtype)
                new[path] = jax.device_put(value, leaf.sharding)
            else:
                new[path] = leaf
        return ckpt_io.nest(new)

    return dataclasses.replace(
        state,
        params=fill("params", state.params),
        expert_bias=fill("expert_bias", state.expert_bias),
    )
