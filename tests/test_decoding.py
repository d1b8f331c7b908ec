"""Replies that end: the repetition penalty, the n-gram block and the loop metric.

The tiny random models loop under plain greedy decoding, which makes them a good positive
control: the same prompt loops with the guard off and does not with it on.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.backends.base import NgramBlocker, penalize_repeats
from lmm.bench.metrics import has_loop


def test_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = penalize_repeats(logits, [0, 1, 0], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5] and logits[0] == 2.0  # a copy; the input is unchanged
    assert penalize_repeats(logits, [0], 1.0) is logits and penalize_repeats(logits, [], 2.0) is logits


def test_ngram_blocker_bans_only_the_completing_token() -> None:
    blocker, reply = NgramBlocker(3), []
    for tok in [5, 6, 7, 5]:
        reply.append(tok)
        blocker.add(reply)
    logits = np.zeros(10, dtype=np.float32)
    assert np.isneginf(blocker.block(logits, [*reply, 6])[7])  # 5 6 -> 7 was seen
    assert not np.isinf(blocker.block(logits, reply)).any()  # nothing followed "7 5" yet


@pytest.mark.parametrize("text,loops", [
    ("She is a nurse. She is a nurse. She is a nurse.", True),
    ("A far-off land of leaves, A far-off land of leaves, The autumn leaves, a far-off land of leaves", True),
    ("Your name is Alice. You told me so when we first met.", False),
    ("Oluwaseun", False),
    ("", False),
])
def test_has_loop(text: str, loops: bool) -> None:
    assert has_loop(text) is loops


def test_config_validates_the_guard() -> None:
    for bad in ({"repetition_penalty": 0.9}, {"repeat_last_n": -1}, {"no_repeat_ngram": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DecodingConfig(**bad)


def _reply(backend, decoding: DecodingConfig) -> list[int]:
    backend.reset_session()
    prompt = backend.formatter.generation_ids([{"role": "user", "content": "the cat sat on the mat"}])
    return list(backend.generate(prompt, decoding))


def _repeats_bigram(tokens: list[int]) -> bool:
    grams = list(zip(tokens, tokens[1:], strict=False))
    return len(set(grams)) < len(grams)


def test_guard_stops_greedy_loops_on_a_real_forward(tiny_backend, backend_name: str) -> None:
    backend = tiny_backend(backend_name, "llama")
    plain = _reply(backend, DecodingConfig(max_tokens=48, repetition_penalty=1.0))
    assert len(plain) == 48 and _repeats_bigram(plain)  # positive control: plain greedy loops here
    blocked = _reply(backend, DecodingConfig(max_tokens=48, repetition_penalty=1.0, no_repeat_ngram=2))
    assert not _repeats_bigram(blocked)
    penalised = _reply(backend, DecodingConfig(max_tokens=48, repetition_penalty=1.5))
    assert penalised != plain and plain[0] == penalised[0]  # nothing to penalise before the first token
