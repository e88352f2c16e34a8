"""The RL prompt pool: a task's training problems rendered with the chat template, in a seeded
order that is a pure function of the prompt position (so a resumed run draws the same prompts).

Position p is prompt p of the run: epoch p // n uses permutation(seed, epoch) of the n problems.
Every prompt is checked against the context (rl.seq_len - rl.max_new_tokens) before anything is
compiled.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_jax import errors
from deepseek_jax.data import tokenizers
from deepseek_jax.post import chat, tasks
from deepseek_jax.rl import config as rl_config


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: np.ndarray  # int32: the user turn and the assistant generation prompt
    answer: str  # the reference the accuracy reward compares with
    text: str  # the user's message


class Pool:
    def __init__(self, task: rl_config.TaskConfig, rl: rl_config.RLConfig):
        self.tokenizer = tokenizers.ByteTokenizer()
        template = chat.byte_template(self.tokenizer)
        examples = tasks.examples(
            task.name,
            tasks.Split.TRAIN,
            task.problems,
            seed=task.seed,
            think=task.think,
            length=task.length,
        )
        self.prompts = []
        for ex in examples:
            text = template.render(ex.prompt_messages(), add_generation_prompt=True)
            ids, _ = template.encode(self.tokenizer, text)
            if len(ids) > rl.max_prompt_len:
                raise errors.UserError(
                    f"rl.seq_len: the prompt {ex.prompt!r} of task {task.name.value} is "
                    f"{len(ids)} tokens, longer than the context left for prompts: rl.seq_len "
                    f"{rl.seq_len} - rl.max_new_tokens {rl.max_new_tokens} = {rl.max_prompt_len}"
                )
            self.prompts.append(Prompt(ids.astype(np.int32), ex.answer, ex.prompt))
        self.seed = rl.seed

    def __len__(self) -> int:
        return len(self.prompts)

    def at(self, position: int) -> Prompt:
        epoch, i = divmod(position, len(self.prompts))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
        return self.prompts[int(order[i])]

    def take(self, position: int, n: int) -> list[Prompt]:
        return [self.at(position + i) for i in range(n)]

    def decode(self, ids: np.ndarray) -> str:
        """A completion's text: its tokens up to (not including) EOS."""
        ids = np.asarray(ids)
        ids = ids[ids >= 0]
        stop = np.flatnonzero(ids == self.tokenizer.eos_id)
        return self.tokenizer.decode(ids[: stop[0]] if stop.size else ids)
