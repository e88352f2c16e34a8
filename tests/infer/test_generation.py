"""Batched generation: greedy against transformers, sampling controls, per-row EOS, one compile."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.convert import to_hf
from deepseek_jax.infer import generation, load, sampling
from deepseek_jax.model import transformer
from tests import hf_reference
from tests.convert import helpers
from tests.infer import tiny

CFG = dataclasses.replace(helpers.CONFIGS["v3_qlora_groups_yarn"], vocab_size=64, mtp_depth=0)
N_NEW = 32


def prompts(cfg, n=8):
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, cfg.vocab_size, size=int(L)).astype(np.int32)
        for L in rng.integers(3, 12, size=n)
    ]


def hf_greedy(hf_model, prompt):
    import torch

    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        ids = torch.as_tensor(prompt[None], dtype=torch.long)
        # an explicit mask: without one, generate masks every id equal to pad_token_id
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].numpy()


def check_against_hf(ckpt, hf_model):
    cfg, arrays, _ = load.load(ckpt)
    graphdef, state = load.build(cfg, arrays)
    gen = generation.Generator(graphdef, state, generation.GenerateConfig(max_new_tokens=N_NEW))
    ps = prompts(cfg)
    ours = gen.generate(ps).tokens
    want = np.stack([hf_greedy(hf_model, p) for p in ps])
    mismatch = np.argwhere(ours != want)
    print(f"{len(ps)} prompts x {N_NEW} tokens, {len(mismatch)} mismatches")
    np.testing.assert_array_equal(ours, want)


def test_greedy_equals_transformers_on_our_export(tmp_path):
    state = helpers.random_state(CFG, seed=2)
    helpers.save_state(tmp_path / "step", CFG, state)
    to_hf.convert(
        tmp_path / "step", tmp_path / "hf", dtype=to_hf.ExportDType.FLOAT32, with_mtp=False
    )
    hf_model, _ = helpers.hf_from_pretrained(tmp_path / "hf")
    check_against_hf(tmp_path / "step", hf_model)


def test_greedy_equals_transformers_on_a_transformers_checkpoint(tmp_path):
    hf_model = hf_reference.build_hf_model(CFG, seed=4)
    hf_reference.save(hf_model, tmp_path / "hf")
    check_against_hf(tmp_path / "hf", hf_model)


# -- sampling controls, EOS, compile count (our own tiny model) ---------------------------------
SMALL = tiny.config(vocab_size=48, init_std=0.15)


@pytest.fixture(scope="module")
def small():
    return nnx.split(transformer.Transformer(SMALL, rngs=nnx.Rngs(5)))


def run(small, n=12, **kw):
    graphdef, state = small
    gen = generation.Generator(graphdef, state, generation.GenerateConfig(max_new_tokens=n, **kw))
    return gen, gen.generate(prompts(SMALL, 4))


def test_batched_greedy_equals_each_row_alone(small):
    _, batched = run(small)
    graphdef, state = small
    gen = generation.Generator(graphdef, state, generation.GenerateConfig(max_new_tokens=12))
    for i, p in enumerate(prompts(SMALL, 4)):
        np.testing.assert_array_equal(gen.generate([p]).tokens[0], batched.tokens[i])


def test_decode_step_compiles_once_and_chunks_equal_single_steps(small):
    temp = sampling.SamplingConfig(temperature=1.0)
    gen, first = run(small, sampling=temp, seed=1)  # 8 steps per call: chunks of 8 and 3
    assert first.steps == 11 and gen.traces == 1
    again = gen.generate(prompts(SMALL, 4))
    assert gen.traces == 1  # same batch/cache shape: the compiled step is reused
    np.testing.assert_array_equal(again.tokens, first.tokens)
    graphdef, state = small
    single = generation.Generator(
        graphdef,
        state,
        generation.GenerateConfig(max_new_tokens=12, sampling=temp, seed=1, steps_per_call=1),
    )
    calls = []
    one = single.generate(prompts(SMALL, 4), on_step=lambda t, c: calls.append(c.copy()))
    assert one.steps == 11 and len(calls) == 12  # the prefill's token, then one per step
    np.testing.assert_array_equal(one.tokens, first.tokens)
    np.testing.assert_array_equal(one.logprobs, first.logprobs)
    assert (first.logprobs < 0).all()  # sampled, so the log-probs are real


def test_sampling_seed_top_k_top_p(small):
    temp = sampling.SamplingConfig(temperature=1.0)
    _, a = run(small, sampling=temp, seed=1)
    _, b = run(small, sampling=temp, seed=1)
    _, c = run(small, sampling=temp, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # same seed, same tokens
    assert (a.tokens != c.tokens).any()
    _, greedy = run(small)
    assert (a.tokens != greedy.tokens).any()
    for limit in (
        sampling.SamplingConfig(temperature=1.0, top_k=1),
        sampling.SamplingConfig(temperature=1.0, top_p=1e-6),
    ):
        _, one = run(small, sampling=limit, seed=3)
        np.testing.assert_array_equal(one.tokens, greedy.tokens)


def test_filtered_distributions():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    p = np.asarray(sampling.probs(logits, sampling.SamplingConfig(temperature=1.0, top_k=2)))
    np.testing.assert_allclose(p, [[0.5 / 0.75, 0.25 / 0.75, 0, 0]], rtol=1e-6)
    p = np.asarray(sampling.probs(logits, sampling.SamplingConfig(temperature=1.0, top_p=0.6)))
    # 0.5 < 0.6, so the token that crosses p (0.25) is kept
    np.testing.assert_allclose(p, [[0.5 / 0.75, 0.25 / 0.75, 0, 0]], rtol=1e-6)
    p = np.asarray(sampling.probs(logits, sampling.SamplingConfig(temperature=1.0, top_p=0.5)))
    np.testing.assert_allclose(p, [[1, 0, 0, 0]], rtol=1e-6)
    p = np.asarray(sampling.probs(logits, sampling.SamplingConfig(temperature=0.5)))
    np.testing.assert_allclose(p, np.asarray([[100, 25, 9, 4]]) / 138, rtol=1e-6)


def test_per_row_eos(small):
    _, free = run(small)
    # the EOS id: a token row 0 emits at step 3 that another row never emits before the end
    eos = int(free.tokens[0, 3])
    _, stopped = run(small, eos_id=eos)
    for row, ref in zip(stopped.tokens, free.tokens):
        hits = np.flatnonzero(ref == eos)
        stop = hits[0] + 1 if len(hits) else len(ref)
        np.testing.assert_array_equal(row[:stop], ref[:stop])
        assert (row[stop:] == -1).all()
    assert (stopped.tokens[0, 4:] == -1).all()
    assert any(eos not in ref for ref in free.tokens)  # some row ran to max_new_tokens


@pytest.mark.parametrize(
    "bad,field",
    [
        (dict(temperature=-0.5), "--temperature"),
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(top_k=-1), "--top-k"),
    ],
)
def test_bad_sampling_values_name_the_flag(bad, field):
    with pytest.raises(ValueError, match=field):
        sampling.SamplingConfig(**bad)


def test_bad_max_new_tokens_names_the_flag():
    with pytest.raises(ValueError, match="--max-new-tokens"):
        generation.GenerateConfig(max_new_tokens=0)
