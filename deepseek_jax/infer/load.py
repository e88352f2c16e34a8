"""Checkpoints for inference: our step directories and workdirs, or Hugging Face directories.

The same readers as `score` (HF dirs incl. official FP8, dequantised as in from-hf), but the MTP
weights are kept when the checkpoint has them: speculative decoding drafts with them.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from deepseek_jax.convert import ckpt_io, from_hf, mapping
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.model import config as config_lib

Arrays = dict[str, dict[mapping.Path, np.ndarray]]


def load(
    checkpoint: pathlib.Path, step: int | None = None, *, with_mtp: bool = True
) -> tuple[config_lib.ModelConfig, Arrays, dict]:
    """(config, {collection: {path: array}}, the checkpoint's experiment config or {})."""
    checkpoint = pathlib.Path(checkpoint).absolute()  # orbax refuses relative paths
    if not checkpoint.exists():
        raise ConversionError(f"--checkpoint: {checkpoint} does not exist")
    if (checkpoint / "config.json").is_file():
        if step is not None:
            raise ConversionError(
                f"{checkpoint}: --step does not apply to a Hugging Face directory"
            )
        src = from_hf.open_source(checkpoint)  # validates every header, MTP included
        if not with_mtp and src.cfg.mtp_depth:
            cfg = dataclasses.replace(src.cfg, mtp_depth=0)
            src = dataclasses.replace(src, cfg=cfg, specs=mapping.tensor_specs(cfg))
        return src.cfg, from_hf.load_arrays(src), {}
    step_dir = ckpt_io.resolve_step_dir(checkpoint, step)
    experiment = ckpt_io.read_config(step_dir)
    full = ckpt_io.model_config(step_dir)
    reader = ckpt_io.StateReader(step_dir)
    reader.check(mapping.model_leaves(full))
    cfg = full if with_mtp else dataclasses.replace(full, mtp_depth=0)
    arrays = {
        c: {p: reader.read(c, p) for p in leaves} for c, leaves in mapping.model_leaves(cfg).items()
    }
    return cfg, arrays, experiment


def build(cfg: config_lib.ModelConfig, arrays: Arrays):
    """(graphdef, state) of the model with these arrays (parameters and expert biases)."""
    import jax.numpy as jnp
    from flax import nnx

    from deepseek_jax.model import layers, transformer, tree

    model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, biases = nnx.split(model, nnx.Param, layers.ExpertBias)
    dtype = cfg.param_dtype.jnp
    params = tree.with_arrays(params, lambda p, _: jnp.asarray(arrays["params"][p], dtype))
    biases = tree.with_arrays(biases, lambda p, _: jnp.asarray(arrays["expert_bias"][p]))
    return nnx.split(nnx.merge(graphdef, params, biases))
