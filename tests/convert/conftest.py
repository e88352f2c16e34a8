"""Session-wide fixtures: each test config is saved, exported and run through our model once."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import numpy as np
import pytest

from deepseek_jax.convert import __main__ as convert_cli
from deepseek_jax.model import config as config_lib
from tests.convert import helpers

# One config is exported in many small shards, so every transformers load also covers the index.
SHARD_SIZE = {"v3_qlora_groups_yarn": "40KB"}


@dataclasses.dataclass
class Exported:
    name: str
    cfg: config_lib.ModelConfig
    state: helpers.State
    step_dir: pathlib.Path  # our checkpoint
    hf_dir: pathlib.Path  # float32 export, MTP included
    tokens: np.ndarray
    logits: np.ndarray  # ours
    mtp_logits: np.ndarray | None


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Callable[[str], Exported]:
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            cfg = helpers.CONFIGS[name]
            root = tmp_path_factory.mktemp(name)
            state = helpers.random_state(cfg, seed=sorted(helpers.CONFIGS).index(name) + 1)
            helpers.save_state(root / "step", cfg, state)
            argv = [
                "to-hf",
                f"--checkpoint={root / 'step'}",
                f"--out={root / 'hf'}",
                "--dtype=float32",
                f"--shard-size={SHARD_SIZE.get(name, '5GB')}",
            ]
            assert convert_cli.main(argv) == 0
            tokens = helpers.tokens_for(cfg)
            logits, mtp = helpers.our_outputs(cfg, state, tokens)
            cache[name] = Exported(
                name, cfg, state, root / "step", root / "hf", tokens, logits, mtp
            )
        return cache[name]

    return get
