"""The trainer with a pipeline, end to end: `parallel.pipeline=dualpipe` on pipe=2 x data=4 runs
the real loop (data, evaluation, metrics, checkpoint) and follows the unpipelined trainer on data=8:
the same losses, and a final checkpoint holding the same canonical state.

The step-level equality of every schedule is test_pipeline_step.py's; this checks the wiring in
`train.loop` (plan, pipe-sharded state, eval step on the pipelined mesh, checkpoint layout).
"""

import jax
import numpy as np
import pytest

from deepseek_jax import config as experiment
from deepseek_jax.train import checkpoint, loop, metrics, optim
from deepseek_jax.train import state as state_lib
from tests.parallel import cases

STEPS = 2
OVERRIDES = {
    # configs/tiny.py shrunk to compile fast; 2 MoE layers = one per DualPipe stage at PP=2.
    # init_std 0.2 keeps router scores apart (no near-tie top-k can flip between the layouts).
    "model.d_model": 32,
    "model.n_layers": 3,
    "model.intermediate_size": 48,
    "model.n_heads": 2,
    "model.q_lora_rank": 16,
    "model.kv_lora_rank": 16,
    "model.qk_nope_head_dim": 8,
    "model.qk_rope_head_dim": 4,
    "model.v_head_dim": 8,
    "model.moe_intermediate_size": 16,
    "model.init_std": 0.2,
    "train.steps": STEPS,
    "train.global_batch_size": 16,
    "train.seq_len": 16,
    "train.warmup_steps": 0,
    "train.log_every": 1,
    "train.eval_every": 1000,
    "train.eval_batches": 1,
    # Adam's first update is ~lr * sign(g) at eps=1e-8, so float32 rounding of a near-zero
    # gradient could move a parameter by lr; a larger eps makes the update smooth in g.
    "train.eps": 1e-3,
    "checkpoint.every_steps": 1000,
    "checkpoint.async_save": False,
}
PIPELINED = {"parallel.pipe": 2, "parallel.pipeline": "dualpipe", "parallel.microbatches": 4}


def _final_state(exp, workdir):
    abstract = state_lib.abstract_state(exp.model, optim.optimizer(exp.train))
    with checkpoint.Checkpointer(workdir) as ckpt:
        return ckpt.restore(STEPS, abstract).state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in (("pipelined", PIPELINED), ("unpipelined", {})):
        exp = experiment.load("configs/tiny.py", {**OVERRIDES, **extra})
        workdir = tmp_path_factory.mktemp(name)
        summary = loop.run(exp, workdir)
        out[name] = (exp, workdir, summary)
    return out


def test_pipelined_trainer_follows_the_unpipelined_one(runs):
    (exp_p, dir_p, sum_p), (exp_u, dir_u, sum_u) = runs["pipelined"], runs["unpipelined"]
    assert exp_p.parallel.pipeline.value == "dualpipe" and sum_p["step"] == sum_u["step"] == STEPS

    def losses(workdir):
        return {
            (r["split"], r["step"]): r["loss" if r["split"] == "train" else "eval_loss"]
            for r in metrics.read_metrics(workdir)
        }

    got, want = losses(dir_p), losses(dir_u)
    assert (
        sorted(got)
        == sorted(want)
        == sorted([("eval", 0), ("eval", STEPS)] + [("train", i) for i in range(1, STEPS + 1)])
    )
    errors = {k: cases.rel_err(got[k], want[k]) for k in want}
    print(
        "\npipelined vs unpipelined trainer:",
        {f"{s}{n}": f"{e:.1e}" for (s, n), e in errors.items()},
    )
    assert max(errors.values()) <= 1e-5, errors

    a, b = _final_state(exp_p, dir_p), _final_state(exp_u, dir_u)
    assert int(a.step) == int(b.step) == STEPS
    for x, y in zip(
        jax.tree.leaves((a.params, a.expert_bias)), jax.tree.leaves((b.params, b.expert_bias))
    ):
        assert cases.rel_err(np.asarray(x), np.asarray(y)) <= 1e-5
