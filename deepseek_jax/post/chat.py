"""Chat templates and the loss mask of a conversation.

A template renders a list of messages ({"role": "system" | "user" | "assistant", "content": str})
to text. HF tokenizers bring theirs in tokenizer_config.json (`chat_template`, jinja2); it is
rendered in the environment transformers uses (sandboxed, trim_blocks and lstrip_blocks,
`raise_exception`, `tojson`, loop controls, `{% generation %}` accepted), with `bos_token` and
`eos_token` from the same file, so the text equals `apply_chat_template(..., tokenize=False)`.
The byte tokenizer has a built-in template (`byte_template`).

Which tokens are targets is derived, never guessed: for assistant turn i, the render of
messages[:i] with the generation prompt must be a prefix of the render of messages[:i+1]; the
new suffix up to and including its first EOS is the turn's target (the assistant's content as
the template writes it, and the EOS). Anything a template writes after the EOS (ChatML's "\\n")
is not. The conversation is then tokenized once, and a token is a target iff its character span
lies inside a target span; a token straddling a span edge is an error, not a guess. Templates
that rewrite earlier turns once later ones follow (R1 strips `<think>` from earlier assistant
turns) are not prefix-stable: such a conversation becomes one sample per assistant turn, each
with the history as the template renders it and that turn as its only target.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from deepseek_jax.data import sources
from deepseek_jax.data import tokenizers as tok_lib

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]

# Built-in template of the byte tokenizer: role markers are plain text (the byte vocabulary has
# no special tokens but EOS and PAD); each assistant turn ends in EOS, spelled BYTE_EOS in the
# text and encoded as the tokenizer's EOS id.
BYTE_EOS = "<|eos|>"
BYTE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One tokenized training sample: `ids` int32 [N]; `target` bool [N], True where token j is
    predicted (from token j-1) in the loss. `origin` names it in errors ("file:line")."""

    ids: np.ndarray
    target: np.ndarray
    origin: str = ""


class ChatTemplate:
    """A compiled chat template with its special-token strings.

    `split_specials` maps special strings to ids for tokenizers that do not recognise them in
    text themselves (the byte tokenizer); HF tokenizers parse their added tokens, so it is
    empty there. `specials` lists every special string message content must not contain.
    """

    def __init__(
        self,
        source: str,
        template: str,
        *,
        eos_token: str,
        bos_token: str | None = None,
        split_specials: Mapping[str, int] | None = None,
        specials: Sequence[str] = (),
    ) -> None:
        import jinja2

        self.source = source
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.split_specials = dict(split_specials or {})
        self.specials = tuple(sorted({eos_token, *([bos_token] if bos_token else []), *specials}))
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise sources.DataError(f"{source}: chat_template is not valid jinja2 ({e})") from e

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:
            raise sources.DataError(f"{self.source}: chat_template failed to render: {e}") from e

    def encode(self, tokenizer: tok_lib.Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N], character spans [N, 2]) of `text`: one tokenization, specials included."""
        if not self.split_specials:
            return tokenizer.encode_with_offsets(text)
        ids, spans, start = [], [], 0
        while start < len(text):
            hits = [(text.find(s, start), s) for s in self.split_specials]
            hits = [(i, s) for i, s in hits if i >= 0]
            stop, special = min(hits) if hits else (len(text), None)
            part_ids, part_spans = tokenizer.encode_with_offsets(text[start:stop])
            ids.append(part_ids)
            spans.append(part_spans + start)
            if special is None:
                break
            ids.append(np.asarray([self.split_specials[special]], np.int32))
            spans.append(np.asarray([[stop, stop + len(special)]], np.int64))
            start = stop + len(special)
        if not ids:
            return np.zeros(0, np.int32), np.zeros((0, 2), np.int64)
        return np.concatenate(ids).astype(np.int32), np.concatenate(spans)


def byte_template(tokenizer: tok_lib.ByteTokenizer) -> ChatTemplate:
    return ChatTemplate(
        "the byte tokenizer's built-in template",
        BYTE_TEMPLATE,
        eos_token=BYTE_EOS,
        split_specials={BYTE_EOS: tokenizer.eos_id},
    )


def from_tokenizer_config(path: str) -> ChatTemplate:
    """The chat template of a local tokenizer_config.json (never downloaded)."""
    if not os.path.isfile(path):
        raise sources.DataError(f"no such tokenizer_config.json: {path!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise sources.DataError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(cfg, dict):
        raise sources.DataError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates, as HF allows: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise sources.DataError(
            f"{path} has no chat_template (a string, or a list with a 'default' entry); add "
            f"one, or use a chat_template.jinja's text as its value"
        )
    eos = _token_text(cfg.get("eos_token"))
    if eos is None:
        raise sources.DataError(f"{path}: eos_token is missing; the loss needs each turn's EOS")
    added = cfg.get("added_tokens_decoder") or {}
    specials = [
        t["content"]
        for t in added.values()
        if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str)
    ]
    return ChatTemplate(
        path,
        template,
        eos_token=eos,
        bos_token=_token_text(cfg.get("bos_token")),
        specials=specials,
    )


def tokenize(
    template: ChatTemplate,
    tokenizer: tok_lib.Tokenizer,
    messages: Sequence[Message],
    origin: str = "",
) -> list[Sample]:
    """The samples of one conversation (one, or one per assistant turn if the template is not
    prefix-stable), targets exactly on each assistant turn's content and EOS."""
    where = f"{origin}: " if origin else ""
    for j, m in enumerate(messages):
        for s in template.specials:
            if s in m["content"]:
                raise sources.DataError(
                    f"{where}message {j} ({m['role']}) contains the special token {s!r} in its "
                    f"text; it would be tokenized as that token"
                )
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise sources.DataError(f"{where}the conversation has no assistant turn to train on")
    spans, texts = [], []
    for i in turns:
        prompt = template.render(messages[:i], add_generation_prompt=True)
        turn = template.render(messages[: i + 1])
        if not turn.startswith(prompt):
            raise sources.DataError(
                f"{where}{template.source}: the render with the generation prompt is not a prefix "
                f"of the render with assistant message {i}; the chat template's generation prompt "
                f"differs from how it writes assistant turns, so no mask can be derived"
            )
        eos_at = turn.find(template.eos_token, len(prompt))
        if eos_at < 0:
            raise sources.DataError(
                f"{where}{template.source}: assistant message {i} is not followed by eos_token "
                f"{template.eos_token!r} in the rendered conversation"
            )
        end = eos_at + len(template.eos_token)
        spans.append((len(prompt), end))
        texts.append(turn[:end])
    full = template.render(messages)
    if all(full.startswith(t) for t in texts):
        groups = [(texts[-1], spans)]
    else:
        groups = [(t, [s]) for t, s in zip(texts, spans)]
    return [_sample(template, tokenizer, text, sp, origin) for text, sp in groups]


def _sample(
    template: ChatTemplate,
    tokenizer: tok_lib.Tokenizer,
    text: str,
    spans: Sequence[tuple[int, int]],
    origin: str,
) -> Sample:
    where = f"{origin}: " if origin else ""
    ids, offsets = template.encode(tokenizer, text)
    target = np.zeros(ids.shape, bool)
    for a, b in spans:
        inside = (offsets[:, 0] >= a) & (offsets[:, 1] <= b)
        straddles = ((offsets[:, 0] < a) & (offsets[:, 1] > a)) | (
            (offsets[:, 0] < b) & (offsets[:, 1] > b)
        )
        if straddles.any():
            j = int(np.flatnonzero(straddles)[0])
            raise sources.DataError(
                f"{where}token {j} ({tokenizer.decode(ids[j : j + 1])!r})"
                f" spans both template text and assistant text, so it can be neither a target nor "
                f"context; the tokenizer merges across the template's boundary"
            )
        target |= inside & (offsets[:, 1] > offsets[:, 0])
    if target[0]:
        raise sources.DataError(f"{where}the rendered text starts with a target token")
    return Sample(ids=ids, target=target, origin=origin)


def _token_text(value: object) -> str | None:
    """A tokenizer_config special token: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _environment():
    """The jinja2 environment transformers renders chat templates in (its
    `_cached_compile_jinja_template`): same options, globals and `tojson`."""
    import jinja2
    from jinja2 import ext, nodes, sandbox

    class Generation(ext.Extension):
        # HF's `{% generation %}` marks assistant text for return_assistant_tokens_mask; our
        # masks come from prefix diffs, so the block renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env
