"""A tiny byte-vocabulary policy checkpoint shared by the rl tests (one dense + one MoE layer,
MTP 1), whose EOS is likely enough that rows stop at different lengths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from deepseek_jax.model import config as config_lib
from tests.convert import helpers

EOS = 256
CFG = config_lib.ModelConfig(
    vocab_size=258,
    d_model=32,
    n_layers=2,
    first_k_dense_replace=1,
    intermediate_size=64,
    n_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    mtp_depth=1,
)


@dataclasses.dataclass(frozen=True)
class Policy:
    cfg: config_lib.ModelConfig
    step_dir: str
    state: dict


def _likely_eos(state: dict) -> None:
    """Points the EOS column of the head along the mean final hidden state (recovered from the
    logits through the head's pseudo-inverse), so EOS has probability ~0.2 at most positions."""
    import jax.numpy as jnp
    from flax import nnx

    from deepseek_jax.infer import load

    head = state["params"][("head", "kernel")]
    tokens = np.random.default_rng(0).integers(0, 256, (4, 16)).astype(np.int32)
    model = nnx.merge(*load.build(CFG, state))
    logits = np.asarray(model(jnp.asarray(tokens), with_mtp=False).logits_BSY)
    h = logits.reshape(-1, CFG.vocab_size) @ np.linalg.pinv(head)
    m = h.mean(axis=0)
    head[:, EOS] = 6.0 * m / np.dot(m, m)


@pytest.fixture(scope="session")
def policy(tmp_path_factory) -> Policy:
    state = helpers.random_state(CFG, seed=3)
    _likely_eos(state)
    step_dir = tmp_path_factory.mktemp("policy") / "7"
    helpers.save_state(step_dir, CFG, state)
    return Policy(CFG, str(step_dir), state)


def _fine_tune(state: dict, steps: int, lr: float) -> dict:
    """A few hundred teacher-forced steps on the reverse task's R1-format replies (the loss of SFT,
    through rl/logprobs.py), so that sampled completions are sometimes well-formed and rewards,
    hence advantages and gradients, are not all 0."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from deepseek_jax.data import tokenizers
    from deepseek_jax.infer import load
    from deepseek_jax.post import chat, tasks
    from deepseek_jax.rl import logprobs
    from deepseek_jax.train import state as state_lib

    tok = tokenizers.ByteTokenizer()
    template = chat.byte_template(tok)
    samples = [
        chat.tokenize(template, tok, ex.messages())[0]
        for ex in tasks.examples(tasks.Task.REVERSE, tasks.Split.TRAIN, 64, think=True)
    ]
    width = max(len(s.ids) for s in samples)
    tokens = np.zeros((len(samples), width), np.int32)
    mask = np.zeros((len(samples), width - 1), np.float32)
    for i, s in enumerate(samples):
        tokens[i, : len(s.ids)] = s.ids
        mask[i, : len(s.ids) - 1] = s.target[1:]
    graphdef, params, bias = state_lib.split(nnx.merge(*load.build(CFG, state)))
    tx = optax.adam(lr)

    @jax.jit
    def update(params, opt):
        def loss(p):
            logp = logprobs.token_logps(graphdef, p, bias, jnp.asarray(tokens), 1.0)
            return -(logp * mask).sum() / mask.sum()

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for _ in range(steps):
        params, opt = update(params, opt)
    flat = {
        tuple(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    return {"params": flat, "expert_bias": state["expert_bias"]}


@pytest.fixture(scope="session")
def trained_policy(tmp_path_factory) -> Policy:
    state = _fine_tune(helpers.random_state(CFG, seed=3), steps=100, lr=1e-2)
    step_dir = tmp_path_factory.mktemp("trained_policy") / "100"
    helpers.save_state(step_dir, CFG, state)
    return Policy(CFG, str(step_dir), state)
