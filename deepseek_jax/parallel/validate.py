"""Checks of a parallel layout against the model and the batch, before anything is compiled.

Each error names the config fields and the numbers. The config-level rules cover the common
mistakes in config terms; `check_state` then runs the train state's own sharding rules
(`sharding.spec`, the pipeline's stack over `pipe`, ZeRO-1's split over `data`) on the abstract
shapes, so every array that cannot divide over its mesh axes fails here too, naming the axis and
the array, before the data pipeline, the state or any compile exists. The JAX backend is up by then
(make_plan counts the devices); config conversion cannot do this, since it runs before
`jax.distributed.initialize` and must not start JAX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from deepseek_jax.model import config as model_config
from deepseek_jax.model import transformer
from deepseek_jax.parallel import config as config_lib
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel import sharding as sharding_lib


def _fail(msg: str):
    raise ValueError(f"parallel: {msg}")


def check(
    cfg: config_lib.ParallelConfig,
    rules: sharding_lib.Rules,
    sizes: Mapping[str, int],
    model: model_config.ModelConfig,
    global_batch_size: int,
) -> None:
    # The batch axes all carry tokens, but an fsdp or expert axis that splits no parameter is
    # just a second data axis under another name: refuse it rather than mislabel the layout.
    used = rules.param_mesh_axes() | {mesh_lib.DATA}
    for axis in mesh_lib.AXES:
        if axis != mesh_lib.PIPE and axis not in used and sizes[axis] > 1:
            _fail(
                f"preset {cfg.preset.value} shards nothing over `{axis}`, so {axis}="
                f"{sizes[axis]} would only replicate; set {axis}=1 or pick a preset that uses "
                f"it (docs/parallelism.md)"
            )

    def divides(field: str, value: int, logical: str) -> None:
        axes = [a for a in rules.axes(logical) if sizes[a] > 1]
        n = math.prod(sizes[a] for a in axes)
        if value % n:
            where = " x ".join(f"{a}={sizes[a]}" for a in axes)
            _fail(
                f"model.{field}={value} is not divisible by {where} ({n} shards of the "
                f"`{logical}` axis under preset {cfg.preset.value})"
            )

    divides("n_heads", model.n_heads, "heads")
    divides("vocab_size", model.vocab_size, "vocab")
    if model.n_dense_layers:
        divides("intermediate_size", model.intermediate_size, "mlp")
    if model.n_moe_layers or (model.mtp_depth and model.mtp_is_moe):
        divides("n_routed_experts", model.n_routed_experts, "expert")
        divides("moe_intermediate_size", model.moe_intermediate_size, "expert_mlp")
        if model.n_shared_experts:
            divides(
                "n_shared_experts * moe_intermediate_size",
                model.n_shared_experts * model.moe_intermediate_size,
                "mlp",
            )

    batch_axes = [a for a in rules.act_batch if sizes[a] > 1]
    shards = math.prod(sizes[a] for a in batch_axes)
    where = " x ".join(f"{a}={sizes[a]}" for a in batch_axes)
    if global_batch_size % shards:
        _fail(
            f"train.global_batch_size={global_batch_size} is not divisible by the {shards} "
            f"batch shards ({where})"
        )
    if cfg.pipeline is not config_lib.Schedule.NONE:
        rows = global_batch_size // cfg.num_microbatches  # every micro-batch is split the same
        if rows % shards:
            _fail(
                f"a micro-batch of {rows} sequences (train.global_batch_size="
                f"{global_batch_size} / parallel.microbatches={cfg.num_microbatches}) is not "
                f"divisible by the {shards} batch shards ({where})"
            )
    check_state(cfg, rules, sizes, model)


def check_state(
    cfg: config_lib.ParallelConfig,
    rules: sharding_lib.Rules,
    sizes: Mapping[str, int],
    model: model_config.ModelConfig,
) -> None:
    """Every array of the train state divides over the mesh axes it is split on: parameters and
    expert biases by the preset, the MoE stack over `pipe` under a pipeline, and with
    parallel.zero=1 the optimizer state over `data` too. The functions are the ones
    train/sharded.state_specs builds the shardings with; Adam's moments have their parameters'
    shapes and specs, so the parameters stand in for them. Costs one abstract model trace
    (~0.1 s; nothing allocated)."""
    from deepseek_jax.parallel.pipeline import stages  # parallel/pipeline imports parallel/

    (params, bias), (logical_p, logical_b) = transformer.abstract_layout(model)
    p = sharding_lib.tree_specs(rules, logical_p, params, sizes, "params")
    b = sharding_lib.tree_specs(rules, logical_b, bias, sizes, "expert_bias")
    if cfg.pipeline is not config_lib.Schedule.NONE:
        p = stages.stack_over_pipe(p, params, sizes)
        stages.stack_over_pipe(b, bias, sizes, "expert_bias")
    if cfg.zero == 1:
        sharding_lib.zero1_specs(p, params, sizes, what="the optimizer state of params")
