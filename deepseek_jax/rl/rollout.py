"""Rollouts: each prompt sampled G times with the generator, laid out for teacher forcing.

The generator (infer/generation.py) decodes all P * G rows at once, group by group (row
g + G * i is sample g of prompt i), stops each row at its own EOS (kept, as TRL keeps it) or at
max_new_tokens, and returns each token's log-prob under the sampling distribution. Prompts are
padded to one width (rl.seq_len - max_new_tokens), so every step reuses one compile.

A `Rollout` row is `prompt | completion | padding` of exactly rl.seq_len tokens; the masks and
log-probs are over its seq_len - 1 targets (target t is token t + 1), which is where the
trainer's forward (rl/logprobs.py) puts its log-probs. `mask_BT` is True exactly on the
completion's tokens: never on the prompt, never after EOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from deepseek_jax.infer import generation


@dataclasses.dataclass(frozen=True)
class Rollout:
    tokens_BS: np.ndarray  # int32: prompt, completion, then 0
    mask_BT: np.ndarray  # bool: target t (= token t + 1) is a completion token
    sampler_logp_BT: np.ndarray  # float32: the sampler's log-prob of target t; 0 off the mask
    completions_BN: np.ndarray  # int32: the generator's output, -1 after a row stopped
    prompt_len_B: np.ndarray  # int32

    @property
    def completion_len_B(self) -> np.ndarray:
        return self.mask_BT.sum(axis=1)


def assemble(
    prompts: Sequence[np.ndarray], completions_BN: np.ndarray, logp_BN: np.ndarray, seq_len: int
) -> Rollout:
    """The teacher-forcing layout of prompts and the generator's completions."""
    B, N = completions_BN.shape
    tokens = np.zeros((B, seq_len), np.int32)
    mask = np.zeros((B, seq_len - 1), bool)
    logp = np.zeros((B, seq_len - 1), np.float32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    for b, prompt in enumerate(prompts):
        p = len(prompt)
        n = int((completions_BN[b] >= 0).sum())  # emitted tokens are a prefix of the row
        if p + n > seq_len:
            raise ValueError(f"row {b}: prompt {p} + completion {n} exceed seq_len {seq_len}")
        tokens[b, :p] = prompt
        tokens[b, p : p + n] = completions_BN[b, :n]
        mask[b, p - 1 : p - 1 + n] = True  # target t predicts token t + 1
        logp[b, p - 1 : p - 1 + n] = logp_BN[b, :n]
    return Rollout(tokens, mask, logp, completions_BN, lengths)


def generator_state(graphdef, params, expert_bias):
    """(graphdef, state) as the generator takes them, from the trainer's split."""
    return nnx.split(nnx.merge(graphdef, params, expert_bias))


class Sampler:
    """The generator of one run: one compile, the policy's weights swapped in before each step."""

    def __init__(self, graphdef, params, expert_bias, cfg: generation.GenerateConfig):
        self.graphdef = graphdef
        self.generator = generation.Generator(*generator_state(graphdef, params, expert_bias), cfg)

    def set_policy(self, params, expert_bias) -> None:
        self.generator.params = generator_state(self.graphdef, params, expert_bias)[1]

    def sample(
        self, prompts: Sequence[np.ndarray], group_size: int, key: jax.Array, seq_len: int
    ) -> Rollout:
        rows = [p for p in prompts for _ in range(group_size)]
        width = seq_len - self.generator.cfg.max_new_tokens
        result = self.generator.generate(rows, pad_to=width, key=key)
        return assemble(rows, result.tokens, result.logprobs, seq_len)
