"""Scoring: a forward pass over a token file, writing the logits and the mean next-token NLL.

The command line is `python -m deepseek_jax.score` (deepseek_jax/score.py). The checkpoint is one
of our step directories (or a workdir: its latest step) or a Hugging Face / official directory read
directly (FP8 dequantised as in from-hf). The logits [B, T, vocab] are written as float32; the NLL
averages -log p(t_{i+1} | t_{<=i}) over all B*(T-1) positions. MTP heads are not run (they do not
affect the main logits), so their weights are not loaded. The compute dtype is a parameter;
parameters stay float32. Used for parity checks and evaluation.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from deepseek_jax.convert import ckpt_io, from_hf, mapping, outdir
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.model import config as config_lib

Arrays = dict[str, dict[mapping.Path, np.ndarray]]


def _without_mtp(cfg: config_lib.ModelConfig) -> config_lib.ModelConfig:
    return dataclasses.replace(cfg, mtp_depth=0)


def load(
    checkpoint: pathlib.Path, step: int | None = None
) -> tuple[config_lib.ModelConfig, Arrays]:
    """(config without MTP, {collection: {path: array}}) from our checkpoint or an HF dir."""
    checkpoint = pathlib.Path(checkpoint)
    if (checkpoint / "config.json").is_file():
        if step is not None:
            raise ConversionError(
                f"{checkpoint}: --step does not apply to a Hugging Face directory"
            )
        src = from_hf.open_source(checkpoint)  # validates every header, MTP included
        cfg = _without_mtp(src.cfg)
        src = dataclasses.replace(src, cfg=cfg, specs=mapping.tensor_specs(cfg))
        return cfg, from_hf.load_arrays(src)
    step_dir = ckpt_io.resolve_step_dir(checkpoint, step)
    full = ckpt_io.model_config(step_dir)
    reader = ckpt_io.StateReader(step_dir)
    reader.check(mapping.model_leaves(full))
    cfg = _without_mtp(full)
    arrays = {
        c: {p: reader.read(c, p) for p in leaves} for c, leaves in mapping.model_leaves(cfg).items()
    }
    return cfg, arrays


def read_tokens(path: pathlib.Path, vocab_size: int | None = None) -> np.ndarray:
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read as a .npy array ({e})") from None
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ConversionError(
            f"{path}: need an integer array [batch, time], got {tokens.dtype}{list(tokens.shape)}"
        )
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ConversionError(
            f"{path}: need at least one row of two tokens, got {list(tokens.shape)}"
        )
    if vocab_size is not None and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ConversionError(
            f"{path}: token ids span [{tokens.min()}, {tokens.max()}], "
            f"outside the vocabulary [0, {vocab_size})"
        )
    return tokens.astype(np.int32)


def forward(
    cfg: config_lib.ModelConfig, arrays: Arrays, tokens: np.ndarray
) -> tuple[np.ndarray, float]:
    """(float32 logits [B, T, Y], mean next-token NLL)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from deepseek_jax.model import layers, losses, transformer, tree

    model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, biases = nnx.split(model, nnx.Param, layers.ExpertBias)
    params = tree.with_arrays(params, lambda p, _: jnp.asarray(arrays["params"][p]))
    biases = tree.with_arrays(biases, lambda p, _: jnp.asarray(arrays["expert_bias"][p]))

    @jax.jit
    def run(params, biases, tokens_BS):
        logits_BSY = nnx.merge(graphdef, params, biases)(tokens_BS, with_mtp=False).logits_BSY
        logits_BSY = logits_BSY.astype(jnp.float32)
        return logits_BSY, jnp.mean(losses.token_nll(logits_BSY[:, :-1], tokens_BS[:, 1:]))

    logits, nll = run(params, biases, jnp.asarray(tokens))
    return np.asarray(logits), float(nll)


def score(
    checkpoint: pathlib.Path,
    tokens_path: pathlib.Path,
    out: pathlib.Path,
    *,
    step: int | None = None,
    dtype: config_lib.DType = config_lib.DType.FLOAT32,
    overwrite: bool = False,
) -> float:
    out = pathlib.Path(out)
    outdir.check_target(out, overwrite)
    read_tokens(tokens_path)  # shape and dtype problems before the (slow) model load
    cfg, arrays = load(checkpoint, step)
    tokens = read_tokens(tokens_path, cfg.vocab_size)
    cfg = dataclasses.replace(cfg, compute_dtype=dtype)
    logits, nll = forward(cfg, arrays, tokens)
    with outdir.atomic_path(out, overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, logits)
    return nll
