"""MTP self-speculative decoding: greedy = plain greedy, an offline acceptance oracle, cache
rollback = fresh prefill, and rejection sampling preserving the sampling distribution."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.infer import generation, sampling
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import transformer
from tests.infer import tiny

CFG = tiny.config(vocab_size=12, mtp_depth=1, init_std=0.1)
N_NEW = 24
PROMPTS = [
    np.array(p, np.int32) for p in ([1, 2, 3, 4, 5], [7, 3, 9], [2, 11, 4, 4, 0, 6, 8], [5, 5])
]


def f(dtype):
    d = config_lib.DType(dtype)
    return dataclasses.replace(CFG, param_dtype=d, compute_dtype=d)


def echoing_mtp(m: transformer.Transformer) -> transformer.Transformer:
    """A random model whose MTP module drafts often right, so both accept and reject paths run:
    eh_proj mostly passes the hidden state through and the block's outputs are damped, so the
    draft is close to the main model's own prediction at the same position (right whenever the
    model repeats a token). The block, its attention and its cache still contribute."""
    layers = m.mtp.layers
    D = m.cfg.d_model
    eh = layers.eh_proj.kernel[...]
    eye = jnp.eye(D, dtype=eh.dtype)[None]
    layers.eh_proj.kernel[...] = jnp.concatenate([0.3 * eh[:, :D], eye + 0.3 * eh[:, D:]], 1)
    block = layers.block
    block.attn.wo.kernel[...] = 0.3 * block.attn.wo.kernel[...]
    block.ffn.w2[...] = 0.3 * block.ffn.w2[...]
    block.ffn.shared.w2.kernel[...] = 0.3 * block.ffn.shared.w2.kernel[...]
    return m


@functools.cache
def model(dtype):
    """The same weights in either dtype (drawn in float32)."""
    _, state = nnx.split(echoing_mtp(transformer.Transformer(f("float32"), rngs=nnx.Rngs(11))))
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: transformer.Transformer(f(dtype), rngs=nnx.Rngs(0)))
    )
    return graphdef, jax.tree.map(lambda a: a.astype(dtype), state)


def generator(dtype, k, n_new=N_NEW, **kw):
    graphdef, state = model(dtype)
    cfg = generation.GenerateConfig(
        max_new_tokens=n_new, draft_tokens=k, cache_dtype=jnp.dtype(dtype), **kw
    )
    return generation.Generator(graphdef, state, cfg)


@functools.cache
def greedy(dtype, k):
    """Greedy generation of PROMPTS (k = 0: plain decoding), each compiled and run once for the
    tests that compare against it; call under enable_x64 for float64."""
    return generator(dtype, k).generate(PROMPTS)


def near_tie_report(dtype, plain, spec):
    """Positions where the two differ, with the top-1 - top-2 logit gap of the plain path there."""
    graphdef, state = model(dtype)
    full = nnx.merge(graphdef, state)
    out = []
    for b, p in enumerate(PROMPTS):
        diff = np.flatnonzero(plain[b] != spec[b])
        if not len(diff):
            continue
        j = diff[0]
        seq = np.concatenate([p, plain[b, :j]])[None]
        logits = np.sort(np.asarray(full(jnp.asarray(seq), with_mtp=False).logits_BSY[0, -1]))
        out.append((b, int(j), float(logits[-1] - logits[-2])))
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(k, dtype):
    with jax.enable_x64(dtype == "float64"):
        plain = greedy(dtype, 0).tokens
        spec = greedy(dtype, k)
        rates = spec.stats["acceptance_per_position"]
        print(
            f"k={k} {dtype}: acceptance {np.round(rates, 3).tolist()}, mean accepted length "
            f"{spec.stats['mean_accepted_length']:.2f}, {spec.steps} steps"
        )
        assert 0.1 < rates[0] < 0.9 and rates[-1] > 0  # accept and reject paths both ran
        if dtype == "float64":
            np.testing.assert_array_equal(spec.tokens, plain)
        else:
            ties = near_tie_report(dtype, plain, spec.tokens)
            print(f"float32 mismatches (row, index, top1-top2 gap): {ties}")
            assert all(gap < 1e-4 for _, _, gap in ties)


def run_logged(gen, prompts):
    """Drives the compiled step by hand: (final state, per-step (n, draft, accepted, active))."""
    tokens, lengths = generation.pad_prompts(prompts)
    start, step = gen.compiled(*tokens.shape)
    s = start(gen.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0))
    log = []
    while not np.asarray(s.out.done_B).all():
        before = (np.asarray(s.cache.length_B), np.asarray(s.draft_B), ~np.asarray(s.out.done_B))
        s = step(gen.params, s)
        log.append(before + (np.asarray(s.accepted_B),))
    return s, log


def sequences(prompts, out):
    return [np.concatenate([p, row[row >= 0]]) for p, row in zip(prompts, out)]


def test_in_loop_decisions_equal_the_teacher_forced_oracle():
    """k=1: each draft is the MTP head's teacher-forced prediction on the final sequence, and it
    is accepted exactly when that prediction equals the final token."""
    with jax.enable_x64(True):
        gen = generator("float64", 1)
        s, log = run_logged(gen, PROMPTS)
        seqs = sequences(PROMPTS, np.asarray(s.out.tokens_BN))
        z, lens = generation.pad_prompts(seqs)
        graphdef, state = model("float64")
        tf = nnx.merge(graphdef, state)(jnp.asarray(z)).mtp_logits_JBSY[0]
        oracle = np.asarray(jnp.argmax(tf, -1))  # [B, S]: MTP at i predicts token i+2
        checked = accepted = 0
        for n, draft, active, acc in log:
            for b in np.flatnonzero(active):
                if n[b] + 1 >= lens[b]:
                    continue  # the draft's target lies past the final sequence
                assert draft[b] == oracle[b, n[b] - 1]
                assert (acc[b] == 1) == (oracle[b, n[b] - 1] == z[b, n[b] + 1])
                checked += 1
                accepted += int(acc[b])
        print(f"{checked} drafts checked against the oracle, {accepted} accepted")
        assert checked > 20 and 0 < accepted < checked


def generator_with_depth(depth: int, k: int):
    if depth == 1:
        return generator("float64", k)
    cfg = generation.GenerateConfig(
        max_new_tokens=N_NEW, draft_tokens=k, cache_dtype=jnp.dtype("float64")
    )
    return generation.Generator(*two_modules(0.5), cfg)


@pytest.mark.parametrize("depth", [1, 2])
def test_rollback_caches_equal_a_fresh_prefill(depth):
    with jax.enable_x64(True):
        gen = generator_with_depth(depth, 2)
        tokens, lengths = generation.pad_prompts(PROMPTS)
        start, step = gen.compiled(*tokens.shape)
        s = start(gen.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0))
        rejected = False
        for _ in range(6):
            s = step(gen.params, s)
            rejected |= bool((np.asarray(s.accepted_B) < 2).any())
        assert rejected and (np.asarray(s.accepted_B) > 0).any()
        n = np.asarray(s.cache.length_B)
        seqs = sequences(PROMPTS, np.asarray(s.out.tokens_BN))
        accepted = [q[:m] for q, m in zip(seqs, n)]  # in the cache; q[m] is the pending token
        fresh_gen = generator_with_depth(depth, 2)
        ft, fl = generation.pad_prompts(accepted)
        fresh = fresh_gen.compiled(*ft.shape)[0](
            fresh_gen.params, jnp.asarray(ft), jnp.asarray(fl), jax.random.key(0)
        )
        np.testing.assert_array_equal(np.asarray(fresh.cache.length_B), n)
        np.testing.assert_array_equal(np.asarray(fresh.mtp_cache.length_B), n)
        np.testing.assert_array_equal(np.asarray(fresh.token_B), [q[m] for q, m in zip(seqs, n)])
        for got_c, want_c in ((s.cache, fresh.cache), (s.mtp_cache, fresh.mtp_cache)):
            for name, kv in got_c.stacks.items():
                for got, want in zip(jax.tree.leaves(kv), jax.tree.leaves(want_c.stacks[name])):
                    for b, m in enumerate(n):
                        np.testing.assert_allclose(
                            np.asarray(got[:, b, :m]), np.asarray(want[:, b, :m]), atol=1e-10
                        )
        np.testing.assert_allclose(np.asarray(s.hn_BD), np.asarray(fresh.hn_BD), atol=1e-10)


def two_modules(noise: float):
    """The float64 model with D = 2: the same main model and first MTP module, and a second
    module that copies the first (noise = 0) or is a perturbed copy."""
    graphdef1, state1 = model("float64")
    graphdef2, state2 = nnx.split(
        nnx.eval_shape(
            lambda: transformer.Transformer(
                dataclasses.replace(f("float64"), mtp_depth=2), rngs=nnx.Rngs(0)
            )
        )
    )
    rng = np.random.default_rng(0)

    def leaf(a1, a2):
        if a1.shape == a2.shape:
            return a1
        assert a1.shape[0] == 1 and a2.shape[0] == 2  # the stacked MTP modules
        second = a1 + noise * rng.standard_normal(a1.shape) * np.std(a1)
        return jnp.concatenate([a1, second.astype(a1.dtype)])

    return graphdef2, jax.tree.map(leaf, state1, state2)


def test_two_mtp_modules_draft_in_turn():
    """D = 2, k = 3: d_2 comes from the second module and d_3 reuses it. A copy of the first
    module reproduces the D = 1 run exactly (the second cache stays equal to the first); a
    perturbed copy changes which drafts are accepted but never the greedy output."""
    with jax.enable_x64(True):
        one = greedy("float64", 3)
        models = {noise: two_modules(noise) for noise in (0.0, 0.5)}
        cfg = generation.GenerateConfig(
            max_new_tokens=N_NEW, draft_tokens=3, cache_dtype=jnp.dtype("float64")
        )
        gen = generation.Generator(*models[0.0], cfg)
        runs = {}
        for noise, (_, state) in models.items():
            gen.params = state  # one compile, the weights swapped in (as rl/rollout.py does)
            runs[noise] = gen.generate(PROMPTS)
        rates = {n: r.stats["acceptance_per_position"] for n, r in runs.items()}
        print(f"acceptance D=1 {one.stats['acceptance_per_position']}, D=2 {rates}")
        np.testing.assert_array_equal(runs[0.0].tokens, one.tokens)
        assert rates[0.0] == one.stats["acceptance_per_position"]
        np.testing.assert_array_equal(runs[0.5].tokens, one.tokens)  # = plain greedy
        assert rates[0.5] != rates[0.0]  # the second module drafted


def chi2_p(counts, expected):
    """Pearson chi^2 goodness of fit; cells expecting < 5 are pooled."""
    assert counts[expected == 0].sum() == 0  # nothing drawn outside the top-k / top-p set
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = keep.sum() - 1
    return float(jax.scipy.special.gammaincc(dof / 2, stat / 2)), stat, int(dof)


TOY = dataclasses.replace(CFG, vocab_size=4, init_std=0.3)


@pytest.mark.parametrize(
    "temp",
    [
        sampling.SamplingConfig(temperature=1.0),
        sampling.SamplingConfig(temperature=0.7, top_k=3, top_p=0.9),
    ],
)
def test_speculative_sampling_matches_the_sampling_distribution(temp):
    """20k rows, 3 tokens each, k=2 drafts: the histogram of (t1, t2, t3) fits the exact
    distribution p(t1) p(t2|t1) p(t3|t1,t2) of the (filtered) sampling, as plain sampling does."""
    graphdef, state = nnx.split(transformer.Transformer(TOY, rngs=nnx.Rngs(2)))
    prompt = np.array([1, 3], np.int32)
    rows, n_new, V = 20_000, 3, TOY.vocab_size
    full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, with_mtp=False).logits_BSY)
    cont = np.stack(np.meshgrid(*[np.arange(V)] * n_new, indexing="ij"), -1).reshape(-1, n_new)
    seqs = np.concatenate([np.broadcast_to(prompt, (len(cont), 2)), cont], 1)
    logp = np.asarray(sampling.log_probs(full(state, jnp.asarray(seqs)), temp))
    joint = np.exp(sum(logp[np.arange(len(cont)), 1 + j, cont[:, j]] for j in range(n_new)))
    np.testing.assert_allclose(joint.sum(), 1, rtol=1e-5)
    results = {}
    for k in (0, 2):
        cfg = generation.GenerateConfig(max_new_tokens=n_new, sampling=temp, draft_tokens=k, seed=7)
        res = generation.Generator(graphdef, state, cfg).generate([prompt] * rows)
        cell = (res.tokens * V ** np.arange(n_new)[::-1]).sum(1)
        p, stat, dof = chi2_p(np.bincount(cell, minlength=V**n_new), rows * joint)
        results[k] = (p, res.stats)
        print(f"k={k}: chi2 {stat:.1f} on {dof} dof, p = {p:.3f} {res.stats}")
    assert 0.2 < results[2][1]["acceptance_per_position"][0] < 0.95  # real rejections happen
    assert results[0][0] > 0.01 and results[2][0] > 0.01
