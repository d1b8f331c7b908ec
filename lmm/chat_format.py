"""Chat messages to token ids, and which of those tokens the user actually wrote.

Owns the chat-template rendering shared by both backends (one Hugging Face tokenizer,
loaded from the same model folder), the stop tokens, and the split of a user turn into
prefix / raw turn tokens / content tokens, and a text encoded as a chat's only user turn
(`standalone_turn`). The content mask is what keeps template scaffolding, including a system
prompt that a template inserts on its own, out of the tokens a memory module learns from.
It does not run any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmm.types import EncodedTurn

Message = dict[str, str]
_MARK = "\u2063TURN\u2063"

_STOP_TOKEN_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>")


@dataclass(frozen=True)
class UserTurn:
    """The tokens of one user turn as it appears in the rendered chat."""

    prefix_ids: list[int]  # everything before the turn
    turn_ids: list[int]  # the turn's tokens, scaffolding included ("raw")
    content_mask: list[bool]  # per turn token: inside the user's own text


class ChatFormatter:
    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; lmm needs an instruction-tuned model")
        stop = {int(t) for t in eos_token_ids if t is not None}
        if tokenizer.eos_token_id is not None:
            stop.add(int(tokenizer.eos_token_id))
        vocab = tokenizer.get_vocab()
        stop.update(vocab[t] for t in _STOP_TOKEN_TEXTS if t in vocab)
        self.stop_ids: set[int] = stop
        self._markers: tuple[str, str] | None = None
        self._system: list[int] | None = None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def generation_ids(self, messages: Sequence[Message]) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=True))

    def fitted_ids(self, msgs: list[Message], first: int, limit: int, keep: int) -> list[int]:
        """Drop the oldest exchanges of `msgs` in place (from index `first`, keeping at least `keep`
        messages there) until the prompt is at most `limit` tokens; return the prompt's ids."""
        prompt = self.generation_ids(msgs)
        while len(prompt) > limit and len(msgs) - first > keep:
            del msgs[first:first + 2]
            prompt = self.generation_ids(msgs)
        return prompt

    def user_turn(self, messages: Sequence[Message], index: int) -> UserTurn:
        """Split the rendering of `messages[: index + 1]` around the user turn at `index`."""
        if messages[index]["role"] != "user":
            raise ValueError(f"message {index} is not a user message")
        before = self.render(messages[:index], add_generation_prompt=False)
        full = self.render(messages[: index + 1], add_generation_prompt=False)
        if not full.startswith(before):
            before = ""  # a template that rewrites earlier turns: treat the whole text as the turn
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids: list[int] = list(enc["input_ids"])
        offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
        n_prefix = sum(1 for start, _ in offsets if start < len(before))
        content = messages[index]["content"].strip()
        c_start = full.find(content, len(before)) if content else -1
        c_end = c_start + len(content)
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        mask = []
        for tok, (start, end) in zip(ids[n_prefix:], offsets[n_prefix:], strict=True):
            inside = c_start >= 0 and start >= c_start and end <= c_end and end > start
            mask.append(inside and tok not in special)
        return UserTurn(prefix_ids=ids[:n_prefix], turn_ids=ids[n_prefix:], content_mask=mask)

    def standalone_turn(self, text: str) -> EncodedTurn:
        """`text` as the only user message: all token ids, the turn's first position (after the
        system prompt, also one the template inserts on its own) and the text's positions."""
        turn = self.user_turn([{"role": "user", "content": text}], 0)
        ids = turn.prefix_ids + turn.turn_ids
        n = len(turn.prefix_ids)
        content = [n + i for i, inside in enumerate(turn.content_mask) if inside]
        if n == 0:  # a template that inserts its own system prompt renders it inside the first turn
            system = self._default_system_ids()
            if system and ids[: len(system)] == system and len(system) <= (content[0] if content else 0):
                n = len(system)
        return EncodedTurn(ids=ids, start=n, content=content)

    def turn_markers(self) -> tuple[str, str]:
        """The text a template puts before and after a user message (found by rendering a marker)."""
        if self._markers is None:
            head = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
            before = self.render(head, add_generation_prompt=False)
            after = self.render([*head, {"role": "user", "content": _MARK}], add_generation_prompt=False)
            turn = after[len(before):] if after.startswith(before) else after
            opening, _, closing = turn.partition(_MARK)
            self._markers = (opening, closing.strip())
        return self._markers

    def _default_system_ids(self) -> list[int]:
        """Tokens a template puts before the first user turn on its own (its default system prompt)."""
        if self._system is None:
            opening, _ = self.turn_markers()
            rendered = self.render([{"role": "user", "content": _MARK}], add_generation_prompt=False)
            at = rendered.rfind(opening) if opening else -1
            self._system = self.encode(rendered[:at]) if at > 0 else []
        return self._system
