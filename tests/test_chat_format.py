"""Which tokens of a user turn count as the user's own text."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lmm.chat_format import ChatFormatter
from lmm.testing import DEFAULT_SYSTEM_PROMPT

EMBEDDED = Path("artifacts/models/SmolLM2-135M-Instruct")


def _formatters(tiny_models: dict[str, Path]) -> list[ChatFormatter]:
    out = [ChatFormatter(AutoTokenizer.from_pretrained(tiny_models["llama"]))]
    if EMBEDDED.is_dir():
        out.append(ChatFormatter(AutoTokenizer.from_pretrained(EMBEDDED)))
    return out


def _content_text(fmt: ChatFormatter, ids: list[int], mask: list[bool]) -> str:
    return fmt.decode([t for t, m in zip(ids, mask, strict=True) if m])


def test_first_turn_excludes_auto_inserted_system_prompt(tiny_models: dict[str, Path]) -> None:
    for fmt in _formatters(tiny_models):
        messages = [{"role": "user", "content": "I am Alice."}]
        turn = fmt.user_turn(messages, 0)
        assert turn.prefix_ids == []  # nothing precedes the first turn...
        raw = fmt.decode(turn.turn_ids, skip_special_tokens=False)
        assert "system" in raw  # ...but the template put a system prompt into it
        assert _content_text(fmt, turn.turn_ids, turn.content_mask).strip() == "I am Alice."


def test_later_turn_prefix_matches_generation_ids(tiny_models: dict[str, Path]) -> None:
    for fmt in _formatters(tiny_models):
        messages = [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "My sister's name is Priya."},
        ]
        turn = fmt.user_turn(messages, 2)
        full = fmt.generation_ids(messages)
        assert full[: len(turn.prefix_ids) + len(turn.turn_ids)] == turn.prefix_ids + turn.turn_ids
        assert _content_text(fmt, turn.turn_ids, turn.content_mask).strip() == "My sister's name is Priya."
        # scaffolding tokens around the content are excluded
        assert not turn.content_mask[0] and not turn.content_mask[-1]


def test_explicit_system_prompt_is_prefix_not_content(tiny_models: dict[str, Path]) -> None:
    fmt = _formatters(tiny_models)[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."}]
    turn = fmt.user_turn(messages, 1)
    assert "Be brief." in fmt.decode(turn.prefix_ids)
    assert DEFAULT_SYSTEM_PROMPT not in fmt.decode(turn.prefix_ids + turn.turn_ids)
    assert _content_text(fmt, turn.turn_ids, turn.content_mask).strip() == "Hi there."


def test_non_user_message_is_rejected(tiny_models: dict[str, Path]) -> None:
    fmt = _formatters(tiny_models)[0]
    with pytest.raises(ValueError, match="not a user message"):
        fmt.user_turn([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 1)


def test_stop_ids_include_end_of_turn(tiny_models: dict[str, Path]) -> None:
    fmt = _formatters(tiny_models)[0]
    assert fmt.tokenizer.convert_tokens_to_ids("<|im_end|>") in fmt.stop_ids
