"""Rollouts: the sampler's log-probs equal the trainer's teacher-forced ones, a key gives
bit-identical rollouts, and the completion mask covers exactly the completion tokens."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.infer import generation, load, sampling
from deepseek_jax.rl import logprobs, rollout
from deepseek_jax.train import state as state_lib
from tests.rl.conftest import EOS

N_NEW, SEQ, G, TEMPERATURE = 12, 32, 4, 0.7
PROMPTS = [np.arange(5, 5 + n, dtype=np.int32) for n in (4, 9, 6)]


@pytest.fixture(scope="module")
def model(policy):
    cfg, arrays, _ = load.load(policy.step_dir)
    return state_lib.split(nnx.merge(*load.build(cfg, arrays)))


@pytest.fixture(scope="module")
def sampler(model):
    cfg = generation.GenerateConfig(
        max_new_tokens=N_NEW,
        sampling=sampling.SamplingConfig(temperature=TEMPERATURE),
        eos_id=EOS,
    )
    return rollout.Sampler(*model, cfg)


@pytest.fixture(scope="module")
def rollouts(sampler):
    return [sampler.sample(PROMPTS, G, jax.random.key(k), SEQ) for k in (1, 1, 2)]


def test_sampler_logprobs_equal_the_trainers(model, rollouts):
    graphdef, params, bias = model
    ro = rollouts[0]
    trainer = np.asarray(logprobs.jitted(graphdef, TEMPERATURE)(params, bias, ro.tokens_BS))
    diff = np.abs(trainer - ro.sampler_logp_BT)[ro.mask_BT]
    print(f"max |sampler - trainer| log-prob over {diff.size} tokens: {diff.max():.2e}")
    assert diff.size == ro.completion_len_B.sum() > 0
    assert diff.max() <= 1e-5
    assert (ro.sampler_logp_BT[ro.mask_BT] < 0).all()  # real log-probs, not the default 0


def test_same_key_gives_bit_identical_rollouts(rollouts):
    a, b, other = rollouts
    np.testing.assert_array_equal(a.tokens_BS, b.tokens_BS)
    np.testing.assert_array_equal(a.sampler_logp_BT, b.sampler_logp_BT)
    np.testing.assert_array_equal(a.mask_BT, b.mask_BT)
    assert not np.array_equal(a.tokens_BS, other.tokens_BS)


def test_mask_covers_exactly_the_completion_tokens(rollouts):
    ro = rollouts[0]
    lengths = ro.completion_len_B
    # The fixture's policy stops some rows at EOS and runs others to max_new_tokens.
    assert lengths.min() < N_NEW and lengths.max() == N_NEW
    for b in range(len(ro.tokens_BS)):
        prompt = PROMPTS[b // G]
        p = len(prompt)
        row = ro.completions_BN[b]
        eos = np.flatnonzero(row == EOS)
        n = eos[0] + 1 if eos.size else N_NEW  # up to and including the first EOS
        assert (row[n:] == -1).all()
        want = np.zeros(SEQ - 1, bool)
        want[p - 1 : p - 1 + n] = True  # target t is token t + 1
        np.testing.assert_array_equal(ro.mask_BT[b], want, err_msg=f"row {b}")
        np.testing.assert_array_equal(ro.tokens_BS[b, :p], prompt)
        np.testing.assert_array_equal(ro.tokens_BS[b, 1:][ro.mask_BT[b]], row[:n])
        assert (ro.sampler_logp_BT[b][~ro.mask_BT[b]] == 0).all()


def test_rows_are_laid_out_group_by_group(rollouts):
    ro = rollouts[0]
    for b in range(len(ro.tokens_BS)):
        assert ro.prompt_len_B[b] == len(PROMPTS[b // G])
