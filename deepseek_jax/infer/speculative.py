"""MTP self-speculative decoding: draft k tokens with the MTP module, verify them in one forward.

State between steps, per row: the main cache holds positions 0..n-1; t_n (emitted) is pending;
the MTP cache holds positions 0..n-1, each position p built from the *main model's* post-norm
hidden h_p and the committed token t_{p+1}; d_1 (the MTP's prediction of t_{n+1} at position n-1)
and its draft distribution q_1 are ready.

One step:
1. Draft d_2..d_k: d_{s} comes from MTP module min(s, D) at position n+s-2, taking emb(d_{s-1})
   and the previous draft's normalised output at position n+s-3 in place of the main hidden state;
   past the D modules the last one is reused (as vLLM does for k > D).
2. Verify [t_n, d_1..d_k] at positions n..n+k in one main forward (the k+1-token decode call);
   p_j is the target distribution after position n+j.
3. Accept the longest prefix of drafts the target agrees with -- greedy: d_{j+1} = argmax p_j;
   sampling: d_{j+1} kept with probability min(1, p_j(d)/q_{j+1}(d)) -- then one more token: at
   the first rejection j, a sample of norm(max(0, p_j - q_{j+1})); if all k stand, the bonus from
   p_k. Each step emits a+1 tokens, and the output has exactly the plain-sampling distribution
   (greedy: exactly the plain greedy tokens).
4. Roll back: the main cache length becomes n' = n+a+1 (later entries are stale, masked, and
   overwritten). The MTP cache entries at n..n+a were written from draft hidden states; one MTP
   call on positions n..n+k with the verify's hidden states and the accepted tokens rewrites them
   from the main model's hidden states -- the rollback -- and its output at n+a is the next d_1.
   With D > 1 every module's cache is rewritten the same way (one call each), so each module's
   cache always holds the committed prefix built from the main model's hidden states, as a fresh
   prefill would leave it; only module 1's output becomes the next d_1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.infer import decode, generation, kv_cache, sampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
    cache: kv_cache.Cache
    mtp_cache: kv_cache.Cache
    token_B: jax.Array  # t_n: emitted, not yet in the main cache
    draft_B: jax.Array  # d_1
    q_BY: jax.Array  # the distribution d_1 was drawn from
    hn_BD: jax.Array  # the MTP module's normalised output at position n-1
    out: generation.Output
    key: jax.Array
    accepted_B: jax.Array  # drafts accepted by the last step (-1 before any)
    proposed_K: jax.Array  # drafts proposed at each draft position (active rows)
    accepted_K: jax.Array  # ... and accepted
    row_steps: jax.Array  # steps summed over active rows


def _draft(model, mtp_cache, tokens_BS, h_BSD, index_B, scfg, key, module=0):
    """MTP call; -> (draft at index_b, its distribution, normalised hidden there, cache)."""
    logits_BSY, hn_BSD, mtp_cache = decode.mtp_forward(
        model, tokens_BS, h_BSD, mtp_cache, module=module
    )
    logits_BY = decode.last(logits_BSY, index_B)
    return (
        sampling.sample(logits_BY, key, scfg),
        sampling.probs(logits_BY, scfg),
        decode.last(hn_BSD, index_B),
        mtp_cache,
    )


def start_fn(gen: generation.Generator, max_len: int):
    cfg, k = gen.cfg, gen.cfg.draft_tokens

    def start(params, tokens_BP, lengths_B, key):
        model = nnx.merge(gen.graphdef, params)
        B, P = tokens_BP.shape
        cache = kv_cache.init(model.cfg, B, max_len, cfg.mode, cfg.cache_dtype)
        mtp_cache = kv_cache.init_mtp(model.cfg, B, max_len, cfg.mode, cfg.cache_dtype)
        logits_BY, h_BPD, cache = decode.prefill(model, tokens_BP, lengths_B, cache)
        key, k1, k2 = jax.random.split(key, 3)
        first_B = sampling.sample(logits_BY, k1, cfg.sampling)
        # MTP prefill: position p takes t_{p+1} (the first generated token at the last position)
        nxt_BP = jnp.concatenate([tokens_BP[:, 1:], tokens_BP[:, :1]], axis=1)
        nxt_BP = nxt_BP.at[jnp.arange(B), lengths_B - 1].set(first_B)
        for m in range(model.cfg.mtp_depth - 1, -1, -1):  # module 0 last: its output is used
            logits_BPY, hn_BPD, mtp_cache = decode.mtp_forward(
                model, nxt_BP, h_BPD, mtp_cache, module=m, prefill=True
            )
        d_logits = decode.last(logits_BPY, lengths_B - 1)
        out = generation.emit(
            generation.empty_output(B, cfg.max_new_tokens),
            first_B[:, None],
            jnp.ones((B,), jnp.int32),
            cfg.eos_id,
        )
        return SpecState(
            cache,
            mtp_cache.with_length(lengths_B),
            first_B,
            sampling.sample(d_logits, k2, cfg.sampling),
            sampling.probs(d_logits, cfg.sampling),
            decode.last(hn_BPD, lengths_B - 1),
            out,
            key,
            jnp.full((B,), -1, jnp.int32),
            jnp.zeros((k,), jnp.int32),
            jnp.zeros((k,), jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    return start


def accept(logits_BWY, drafts_BK, q_BKY, scfg: sampling.SamplingConfig, key):
    """-> (accepted count a [B], the token after them [B]). W = K + 1 verify positions."""
    B, K = drafts_BK.shape
    ku, kr = jax.random.split(key)
    if scfg.greedy:
        ok_BK = drafts_BK == jnp.argmax(logits_BWY[:, :K], axis=-1)
    else:
        p_BWY = sampling.probs(logits_BWY, scfg)
        p_d = jnp.take_along_axis(p_BWY[:, :K], drafts_BK[..., None], -1)[..., 0]
        q_d = jnp.take_along_axis(q_BKY, drafts_BK[..., None], -1)[..., 0]
        u_BK = jax.random.uniform(ku, (B, K), p_d.dtype)
        ok_BK = u_BK * q_d < p_d  # u < p/q, i.e. accept with probability min(1, p/q)
    a_B = jnp.cumprod(ok_BK, axis=1).sum(axis=1).astype(jnp.int32)
    logits_a = decode.last(logits_BWY, a_B)
    if scfg.greedy:
        return a_B, jnp.argmax(logits_a, axis=-1).astype(jnp.int32)
    p_a = decode.last(p_BWY, a_B)
    q_pad = jnp.concatenate([q_BKY, jnp.zeros_like(q_BKY[:, :1])], axis=1)  # bonus: q = 0
    resid = jnp.maximum(p_a - decode.last(q_pad, a_B), 0.0)
    resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p_a)
    nxt = jax.random.categorical(kr, jnp.log(resid), axis=-1).astype(jnp.int32)
    return a_B, nxt


def step_fn(gen: generation.Generator):
    cfg, K = gen.cfg, gen.cfg.draft_tokens

    def step(params, s: SpecState) -> SpecState:
        gen.traces += 1
        model = nnx.merge(gen.graphdef, params)
        D = model.cfg.mtp_depth
        B = s.token_B.shape[0]
        n_B = s.cache.length_B
        keys = jax.random.split(s.key, K + 3)
        drafts, qs, hn_BD, mtp_cache = [s.draft_B], [s.q_BY], s.hn_BD, s.mtp_cache
        zero_B = jnp.zeros((B,), jnp.int32)
        for j in range(1, K):  # draft d_{j+1} at position n+j-1
            d_B, q_BY, hn_BD, mtp_cache = _draft(
                model,
                mtp_cache.with_length(n_B + j - 1),
                drafts[-1][:, None],
                hn_BD[:, None],
                zero_B,
                cfg.sampling,
                keys[j],
                module=min(j, D - 1),
            )
            drafts.append(d_B)
            qs.append(q_BY)
        drafts_BK, q_BKY = jnp.stack(drafts, 1), jnp.stack(qs, 1)
        verify_BW = jnp.concatenate([s.token_B[:, None], drafts_BK], axis=1)
        logits_BWY, h_BWD, cache = decode.forward(model, verify_BW, s.cache)
        a_B, nxt_B = accept(logits_BWY, drafts_BK, q_BKY, cfg.sampling, keys[0])
        # emitted: d_1..d_a then nxt; these are also the MTP inputs t_{p+1} at p = n..n+a
        new_BW = jnp.concatenate([drafts_BK, drafts_BK[:, -1:]], axis=1)
        new_BW = new_BW.at[jnp.arange(B), a_B].set(nxt_B)
        active_B = ~s.out.done_B
        out = generation.emit(s.out, new_BW, a_B + 1, cfg.eos_id)
        n_new = jnp.where(active_B, n_B + a_B + 1, n_B)  # finished rows stay put
        for m in range(D - 1, 0, -1):  # the rollback of the modules past the first
            _, _, mtp_cache = decode.mtp_forward(
                model, new_BW, h_BWD, mtp_cache.with_length(n_B), module=m
            )
        d_B, q_BY, hn_BD, mtp_cache = _draft(
            model, mtp_cache.with_length(n_B), new_BW, h_BWD, a_B, cfg.sampling, keys[K + 1]
        )
        took_K = ((a_B[:, None] >= jnp.arange(1, K + 1)[None]) & active_B[:, None]).sum(0)
        return SpecState(
            cache.with_length(n_new),
            mtp_cache.with_length(n_new),
            nxt_B,
            d_B,
            q_BY,
            hn_BD,
            out,
            keys[K + 2],
            a_B,
            s.proposed_K + active_B.sum().astype(jnp.int32),
            s.accepted_K + took_K.astype(jnp.int32),
            s.row_steps + active_B.sum().astype(jnp.int32),
        )

    return step


def functions(gen: generation.Generator, max_len: int):
    if gen.cfg.draft_tokens < 1:
        raise ValueError(f"--draft-tokens: must be >= 1, got {gen.cfg.draft_tokens}")
    return start_fn(gen, max_len), step_fn(gen)


def summary(s: SpecState) -> dict:
    proposed = np.asarray(s.proposed_K)
    accepted = np.asarray(s.accepted_K)
    rows = int(s.row_steps)
    rate = (accepted / np.maximum(proposed, 1)).tolist()
    return {
        "acceptance_per_position": rate,
        "mean_accepted_length": 1 + accepted.sum() / max(rows, 1),  # tokens per verify
        "verify_steps": rows,
    }
