"""Supervised fine-tuning in the training loop: the packed chat data and the SFT evaluation.

An experiment with `sft.source != none` runs the same loop as pre-training (train/loop.py: the
same sharded step, checkpoints, resume, preemption and metrics); only the data and the eval
differ, and they are built here:
  - `Data`: the conversations of post/sft_corpus.py packed with isolation (post/packing.py) into
    rows with segment ids and per-sample positions, loss on assistant tokens only. Row order is
    reshuffled every epoch from (train.seed, epoch); the iterator's state is the next batch index,
    so a resumed run continues with exactly the batches it would have seen.
  - `Evaluator`: held-out assistant-token loss (nats/token, and bits per byte) over the packed
    held-out samples, and greedy exact match: the held-out prompts answered by the generator
    (infer/generation.py, absorbed MLA decode) and compared with the reference reply.
`resolve` turns `sft.epochs` into `train.steps` and `sft.moe_bias=frozen` into a zero bias-update
rate, before anything is compiled, so the checkpointed config says what actually ran.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import config as config_lib
from deepseek_jax import errors
from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.infer import generation, sampling
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.post import config as sft_config
from deepseek_jax.post import packing, sft_corpus
from deepseek_jax.train import config as train_config
from deepseek_jax.train import sharded
from deepseek_jax.train import state as state_lib

log = logging.getLogger(__name__)
_STATE_FORMAT = 1


def load_corpus(exp: config_lib.ExperimentConfig) -> tuple[tok_lib.Tokenizer, sft_corpus.Corpus]:
    tokenizer = tok_lib.build_tokenizer(exp.data)
    tok_lib.check_vocab(tokenizer, exp.model.vocab_size)
    return tokenizer, sft_corpus.load(exp.sft, tokenizer)


def pack(exp, tokenizer: tok_lib.Tokenizer, samples) -> packing.Row:
    return packing.pack(
        samples, exp.train.seq_len, pad_id=tokenizer.pad_id, token_bytes=tokenizer.token_bytes
    )


def resolve(exp: config_lib.ExperimentConfig, train_rows: int) -> config_lib.ExperimentConfig:
    """The experiment as it will run: steps from sft.epochs, a frozen bias as rate 0."""
    t = exp.train
    if exp.sft.epochs > 0:
        t = dataclasses.replace(
            t, steps=max(1, math.ceil(exp.sft.epochs * train_rows / t.global_batch_size))
        )
    if exp.sft.moe_bias is sft_config.BiasMode.FROZEN:
        t = dataclasses.replace(t, bias_update_rate=train_config.Piecewise((0.0,)))
    return dataclasses.replace(exp, train=t)


class Data:
    """Endless epochs of this process's rows of each global batch of packed SFT rows.

    Global batch b of epoch e holds rows perm_e[k*G : (k+1)*G] (k = b mod batches per epoch);
    the last batch of an epoch is topped up with all-padding rows, so every epoch is the same
    number of steps and no row is dropped. Process i of P builds rows i*G/P .. (i+1)*G/P - 1.
    """

    def __init__(
        self,
        rows: packing.Row,
        *,
        global_batch: int,
        process_index: int,
        process_count: int,
        seed: int,
        pad_id: int,
        fingerprint: str,
    ):
        self.rows, self.G, self.seed, self.pad_id = rows, global_batch, seed, pad_id
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.num_rows = rows["inputs"].shape[0]
        self.batches_per_epoch = -(-self.num_rows // global_batch)
        self.fingerprint = f"{fingerprint}:{global_batch}:{seed}:{rows['inputs'].shape[1]}"
        self._next, self._epoch, self._perm = 0, -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            pad = self.batches_per_epoch * self.G - self.num_rows
            self._perm, self._epoch = np.concatenate([perm, np.full(pad, -1)]), epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, k = divmod(self._next, self.batches_per_epoch)
        start = k * self.G + self.offset
        idx = self._order(epoch)[start : start + self.local]
        self._next += 1
        out = {}
        for name, v in self.rows.items():
            part = v[np.maximum(idx, 0)].copy()
            part[idx < 0] = self.pad_id if name in ("inputs", "targets") else 0
            out[name] = part
        return out

    def get_state(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "kind": "sft",
            "fingerprint": self.fingerprint,
            "next_batch": self._next,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != "sft":
            raise ValueError(f"not an SFT data state: {state!r}")
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"SFT data state was saved for other data (fingerprint {state.get('fingerprint')} "
                f"vs {self.fingerprint}): the samples, global batch, seed or seq_len changed"
            )
        self._next = int(state["next_batch"])


class Evaluator:
    """Held-out assistant-token loss and greedy exact match (see the module docstring)."""

    def __init__(self, exp, graphdef, plan: plan_lib.Plan, tx, tokenizer, corpus):
        t = exp.train
        self.plan, self.G, self.graphdef = plan, t.global_batch_size, graphdef
        index, count = plan.data_shard(t.global_batch_size)
        local = t.global_batch_size // count
        rows = pack(exp, tokenizer, corpus.eval)
        self.batches = [
            {k: v[index * local : (index + 1) * local] for k, v in b.items()}
            for b in packing.batches(rows, t.global_batch_size, pad_id=tokenizer.pad_id)
        ]
        self.fn = sharded.eval_step(plan, exp.model, graphdef, tx)
        self.tokenizer, self.prompts = tokenizer, corpus.prompts
        longest = max((int(s.target.sum()) for s in corpus.eval), default=0)
        if self.prompts and exp.sft.max_new_tokens < longest:
            raise errors.UserError(
                f"sft.max_new_tokens={exp.sft.max_new_tokens} is shorter than the longest "
                f"held-out reply ({longest} tokens with its EOS): exact match could never hold"
            )
        self.gen_cfg = generation.GenerateConfig(
            max_new_tokens=exp.sft.max_new_tokens,
            sampling=sampling.SamplingConfig(temperature=0.0),
            eos_id=tokenizer.eos_id,
        )
        self._gen: generation.Generator | None = None
        if self.prompts and jax.process_count() > 1:
            log.warning(
                "sft exact match runs on one process only; skipped on %d processes",
                jax.process_count(),
            )
            self.prompts = []

    def loss(self, state: state_lib.TrainState) -> dict[str, float]:
        sums = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for b in self.batches:
            out = self.fn(state.params, state.expert_bias, self.plan.global_batch(b, self.G))
            for k in sums:
                sums[k] += float(out[k])
        return {
            "eval_loss": sums["nll_sum"] / max(sums["tokens"], 1.0),
            "eval_bpb": sums["nll_sum"] / math.log(2) / max(sums["bytes"], 1.0),
            "eval_tokens": sums["tokens"],
        }

    def answers(self, state: state_lib.TrainState) -> list[str]:
        """Greedy answers to the held-out prompts, decoded up to EOS."""
        model = nnx.merge(self.graphdef, state.params, state.expert_bias)
        graphdef, variables = nnx.split(model)
        variables = jax.tree.map(jnp.asarray, variables)
        if self._gen is None:  # compiled once; later evals swap in the new parameters
            self._gen = generation.Generator(graphdef, variables, self.gen_cfg)
        self._gen.params = variables
        result = self._gen.generate([p.ids for p in self.prompts])
        return [
            sft_corpus.answer_text(self.tokenizer, row, self.tokenizer.eos_id)
            for row in result.tokens
        ]

    def __call__(self, state: state_lib.TrainState) -> dict[str, float]:
        out = self.loss(state)
        if self.prompts:
            answers = self.answers(state)
            hits = [sft_corpus.exact_match(a, p.reply) for a, p in zip(answers, self.prompts)]
            out["eval_exact_match"] = float(np.mean(hits))
        return out
