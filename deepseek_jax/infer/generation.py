"""Batched generation: prefill, then a host loop over chunks of decode steps with a donated state.

Each call runs up to `steps_per_call` decode steps in a `lax.while_loop` on the device, which
stops early once every row has finished; the host loop between calls streams tokens, checks the
done flags and bounds the total. One step per call is a plain host loop: the lowest streaming
latency, but every step then pays a dispatch and a device->host read, which on a small model is
most of the step (bench/decode.py: the tiny model decodes ~3x faster at 8+ steps per call on
CPU). Plain and speculative decoding (variable tokens per row per step) share the driver, and
the chunked and per-step paths emit the same tokens (the step function and its keys are the
same). Donating the state (cache included) updates the cache in place either way.

Rows are right-padded prompts of unequal length; each row decodes at its own positions. A row
stops at EOS (kept in the output) or after max_new_tokens; its later slots hold -1. Plain
decoding also returns each emitted token's log-probability under the sampling distribution (RL
rollouts compare it with the trainer's); speculative decoding leaves it 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.infer import decode, kv_cache, sampling


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int
    sampling: sampling.SamplingConfig = sampling.SamplingConfig()
    eos_id: int | None = None
    mode: kv_cache.DecodeMode = kv_cache.DecodeMode.ABSORBED
    cache_dtype: Any = jnp.float32
    seed: int = 0
    draft_tokens: int = 0  # > 0: MTP self-speculative decoding with k drafts per step
    steps_per_call: int = 8  # decode steps per device call (1: a host loop over single steps)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(
                f"--max-new-tokens: must be a positive integer, got {self.max_new_tokens}"
            )
        if self.draft_tokens < 0:
            raise ValueError(
                f"--draft-tokens: must be >= 1 with --speculative=mtp, got {self.draft_tokens}"
            )
        if not isinstance(self.steps_per_call, int) or self.steps_per_call < 1:
            raise ValueError(
                f"--steps-per-call: must be a positive integer, got {self.steps_per_call}"
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
    tokens_BN: jax.Array  # int32, -1 where nothing was emitted
    count_B: jax.Array  # tokens emitted per row
    done_B: jax.Array  # bool: EOS emitted or max_new_tokens reached
    logp_BN: jax.Array  # float32 log-prob of each emitted token as sampled; 0 elsewhere


def empty_output(batch: int, n: int) -> Output:
    return Output(
        jnp.full((batch, n), -1, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch, n), jnp.float32),
    )


def emit(
    out: Output,
    new_BW: jax.Array,
    n_B: jax.Array,
    eos_id: int | None,
    logp_BW: jax.Array | None = None,
) -> Output:
    """Appends the first n_b of new_BW[b] (and their log-probs) to each unfinished row, up to and
    including EOS."""
    B, W = new_BW.shape
    N = out.tokens_BN.shape[1]
    j_W = jnp.arange(W)[None, :]
    valid_BW = (j_W < n_B[:, None]) & ~out.done_B[:, None]
    if eos_id is not None:
        is_eos = valid_BW & (new_BW == eos_id)
        after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
        valid_BW = valid_BW & ~after_eos
        hit_eos = jnp.any(is_eos, axis=1)
    else:
        hit_eos = jnp.zeros((B,), bool)
    pos_BW = out.count_B[:, None] + j_W
    valid_BW = valid_BW & (pos_BW < N)
    pos_BW = jnp.where(valid_BW, pos_BW, N)  # out of bounds: dropped
    rows_B1 = jnp.arange(B)[:, None]
    tokens = out.tokens_BN.at[rows_B1, pos_BW].set(new_BW, mode="drop")
    logp = out.logp_BN
    if logp_BW is not None:
        logp = logp.at[rows_B1, pos_BW].set(logp_BW.astype(logp.dtype), mode="drop")
    count = out.count_B + valid_BW.sum(axis=1).astype(jnp.int32)
    return Output(tokens, count, out.done_B | hit_eos | (count >= N), logp)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class State:
    cache: kv_cache.Cache
    token_B: jax.Array  # the last emitted token; not yet in the cache
    out: Output
    key: jax.Array


def pad_prompts(
    prompts: Sequence[np.ndarray], pad_to: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 [B, P] (P = pad_to, or the longest prompt) and lengths [B]."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    width = int(lengths.max()) if pad_to is None else pad_to
    if lengths.max() > width:
        raise ValueError(f"a prompt of {lengths.max()} tokens does not fit pad_to={pad_to}")
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


@dataclasses.dataclass
class Result:
    tokens: np.ndarray  # int32 [B, max_new_tokens], -1 after a row stopped
    steps: int  # decode steps after the prefill
    prefill_s: float
    decode_s: float
    stats: dict[str, Any]  # speculative: acceptance per draft position, mean accepted length
    logprobs: np.ndarray | None = None  # float32 [B, max_new_tokens]; 0 where tokens is -1

    @property
    def generated(self) -> int:
        return int((self.tokens >= 0).sum())

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (the prefill's first token included) per second of prefill+decode."""
        return self.generated / max(self.prefill_s + self.decode_s, 1e-9)


class Generator:
    """Compiles a start (prefill + first token) and a step function for one batch/cache shape."""

    def __init__(self, graphdef, state, cfg: GenerateConfig):
        self.graphdef, self.params, self.cfg = graphdef, state, cfg
        self.traces = 0  # how many times the decode step was traced (compiled)
        self._compiled: dict[tuple, tuple[Callable, Callable]] = {}
        self._chunks: dict[tuple, tuple[Callable, Callable]] = {}
        self._functions_cache: dict[tuple, tuple[Callable, Callable, Any]] = {}

    # -- the jitted pieces --------------------------------------------------------------------
    def _start_fn(self, max_len: int):
        cfg = self.cfg

        def start(params, tokens_BP, lengths_B, key):
            model = nnx.merge(self.graphdef, params)
            B = tokens_BP.shape[0]
            cache = kv_cache.init(model.cfg, B, max_len, cfg.mode, cfg.cache_dtype)
            logits_BY, _, cache = decode.prefill(model, tokens_BP, lengths_B, cache)
            key, sub = jax.random.split(key)
            first_B, logp_B = sampling.sample_with_logp(logits_BY, sub, cfg.sampling)
            out = emit(
                empty_output(B, cfg.max_new_tokens),
                first_B[:, None],
                jnp.ones((B,), jnp.int32),
                cfg.eos_id,
                logp_B[:, None],
            )
            return State(cache, first_B, out, key)

        return start

    def _step_fn(self):
        cfg = self.cfg

        def step(params, s: State) -> State:
            self.traces += 1
            model = nnx.merge(self.graphdef, params)
            logits_B1Y, _, cache = decode.forward(model, s.token_B[:, None], s.cache)
            cache = cache.with_length(cache.length_B + 1)
            key, sub = jax.random.split(s.key)
            nxt_B, logp_B = sampling.sample_with_logp(logits_B1Y[:, 0], sub, cfg.sampling)
            out = emit(s.out, nxt_B[:, None], jnp.ones_like(nxt_B), cfg.eos_id, logp_B[:, None])
            return State(cache, nxt_B, out, key)

        return step

    @staticmethod
    def _chunk_fn(step):
        """Up to n steps on the device, stopping once every row is done; -> (state, steps run)."""

        def chunk(params, s, n):
            def cond(c):
                return (c[0] < n) & ~jnp.all(c[1].out.done_B)

            def body(c):
                return c[0] + 1, step(params, c[1])

            i, s = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), s))
            return s, i

        return chunk

    def cache_len(self, prompt_len: int) -> int:
        extra = self.cfg.draft_tokens + 1 if self.cfg.draft_tokens else 0
        return prompt_len + self.cfg.max_new_tokens + extra

    def _functions(self, batch: int, prompt_len: int):
        """(compiled start, step function, state shape), once per (batch, prompt length)."""
        key = (batch, prompt_len)
        if key not in self._functions_cache:
            if self.cfg.draft_tokens:
                from deepseek_jax.infer import speculative

                start, step = speculative.functions(self, self.cache_len(prompt_len))
            else:
                start, step = self._start_fn(self.cache_len(prompt_len)), self._step_fn()
            tok = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
            lens = jax.ShapeDtypeStruct((batch,), jnp.int32)
            rng = jax.eval_shape(lambda: jax.random.key(0))
            start_c = jax.jit(start).lower(self.params, tok, lens, rng).compile()
            state_shape = jax.eval_shape(start, self.params, tok, lens, rng)
            self._functions_cache[key] = (start_c, step, state_shape)
        return self._functions_cache[key]

    def compiled(self, batch: int, prompt_len: int):
        """(start, step): one decode step per call, AOT-compiled once per (batch, prompt length)."""
        key = (batch, prompt_len)
        if key not in self._compiled:
            start_c, step, shape = self._functions(batch, prompt_len)
            step_c = jax.jit(step, donate_argnums=1).lower(self.params, shape).compile()
            self._compiled[key] = (start_c, step_c)
        return self._compiled[key]

    def compiled_chunk(self, batch: int, prompt_len: int):
        """(start, chunk): chunk(params, state, n) -> (state, steps run), up to n steps per call."""
        key = (batch, prompt_len)
        if key not in self._chunks:
            start_c, step, shape = self._functions(batch, prompt_len)
            n = jax.ShapeDtypeStruct((), jnp.int32)
            chunk = jax.jit(self._chunk_fn(step), donate_argnums=1)
            self._chunks[key] = (start_c, chunk.lower(self.params, shape, n).compile())
        return self._chunks[key]

    def generate(
        self,
        prompts: Sequence[np.ndarray],
        on_step: Callable[[np.ndarray, np.ndarray], None] | None = None,
        *,
        pad_to: int | None = None,
        key: jax.Array | None = None,
    ) -> Result:
        """on_step(tokens [B, N], count [B]) is called after the prefill and every device call
        (every `steps_per_call` steps, or fewer at the end).

        `pad_to`: pad every batch's prompts to this length, so batches of different prompt
        lengths share one compile; `key`: the sampling key (default: key(cfg.seed)).
        """
        tokens, lengths = pad_prompts(prompts, pad_to)
        per_call = self.cfg.steps_per_call
        if per_call > 1:
            start, chunk = self.compiled_chunk(*tokens.shape)
        else:
            start, step = self.compiled(*tokens.shape)
        t0 = time.perf_counter()
        key = jax.random.key(self.cfg.seed) if key is None else key
        state = start(self.params, jnp.asarray(tokens), jnp.asarray(lengths), key)
        done = np.asarray(state.out.done_B)
        t1 = time.perf_counter()
        if on_step is not None:
            on_step(np.asarray(state.out.tokens_BN), np.asarray(state.out.count_B))
        steps = 0
        limit = self.cfg.max_new_tokens - 1  # every step emits >= 1 token per unfinished row
        while not done.all() and steps < limit:
            if per_call > 1:
                state, took = chunk(self.params, state, np.int32(min(per_call, limit - steps)))
                steps += int(took)
            else:
                state = step(self.params, state)
                steps += 1
            done = np.asarray(state.out.done_B)
            if on_step is not None:
                on_step(np.asarray(state.out.tokens_BN), np.asarray(state.out.count_B))
        out = np.asarray(state.out.tokens_BN)
        logprobs = np.asarray(state.out.logp_BN)
        t2 = time.perf_counter()
        stats = {}
        if self.cfg.draft_tokens:
            from deepseek_jax.infer import speculative

            stats = speculative.summary(state)
        self.last_state = state
        return Result(out, steps, t1 - t0, t2 - t1, stats, logprobs)
