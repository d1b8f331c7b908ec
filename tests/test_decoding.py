"""Replies that end: the repetition penalty, the n-gram block and the loop metric; and the memory
contrast (context-aware decoding while a memory is read).

The tiny random models loop under plain greedy decoding, which makes them a good positive
control: the same prompt loops with the guard off and does not with it on.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.backends.decoding import NgramBlocker, contrast_scores, log_softmax, penalize_repeats
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
    for bad in ({"repetition_penalty": 0.9}, {"repeat_last_n": -1}, {"no_repeat_ngram": 1},
                {"memory_contrast": -0.5}, {"memory_contrast": float("nan")}, {"contrast_floor": 0.0},
                {"contrast_floor": 1.5}):
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


def test_contrast_favours_what_the_read_changes_among_plausible_tokens() -> None:
    read = np.log(np.array([0.50, 0.30, 0.15, 0.05], dtype=np.float32))
    plain = np.log(np.array([0.70, 0.10, 0.15, 0.05], dtype=np.float32))
    out = contrast_scores(read, plain, 1.0, 0.2)
    assert np.allclose(out[:3], 2 * read[:3] - plain[:3], atol=1e-5)
    assert int(np.argmax(out)) == 1  # the token the read made three times likelier wins over the plain favourite
    assert np.isneginf(out[3])  # under a fifth of the best token's probability with the read: never chosen
    assert int(np.argmax(contrast_scores(read, plain, 0.0, 0.2))) == 0  # no contrast: the read's own order
    assert np.allclose(log_softmax(np.array([1.0, 1.0], dtype=np.float32)), np.log(0.5))


def _read_reply(backend, decoding: DecodingConfig, extra) -> list[int]:
    backend.set_extra_kv(extra)
    try:
        return _reply(backend, decoding)
    finally:
        backend.set_extra_kv(None)


def test_contrast_acts_only_while_a_memory_is_read(tiny_backend, backend_name: str) -> None:
    """With nothing read, replies are the same with the contrast on and off (bit for bit); with keys and
    values read (the positive control), the first token is the contrast of the two forwards' scores,
    and the reply differs from the one decoded without the contrast."""
    from lmm.types import ExtraKV

    backend = tiny_backend(backend_name, "llama")
    on, off = DecodingConfig(max_tokens=16, memory_contrast=2.0, contrast_floor=1e-3), \
        DecodingConfig(max_tokens=16, memory_contrast=0.0)
    assert _reply(backend, on) == _reply(backend, off)
    statement = backend.formatter.standalone_turn("My cat is called Pepper and she likes the mat.")
    cap = backend.capture(statement.ids, kv_layers=range(backend.num_layers))
    extra = ExtraKV(key="statement", layers={i: cap.kv[i] for i in range(backend.num_layers)},
                    visible_from=statement.start)
    read, contrasted = _read_reply(backend, off, extra), _read_reply(backend, on, extra)
    prompt = backend.formatter.generation_ids([{"role": "user", "content": "the cat sat on the mat"}])
    backend.set_extra_kv(extra)
    try:
        with_read = backend.ops.to_numpy(backend.forward(prompt, backend.new_cache(), "score")[-1])
    finally:
        backend.set_extra_kv(None)
    without = backend.ops.to_numpy(backend.forward(prompt, backend.new_cache(), "score")[-1])
    assert read[0] == int(np.argmax(with_read))
    assert contrasted[0] == int(np.argmax(contrast_scores(with_read, without, 2.0, 1e-3)))
    assert contrasted != read
    # The frozen stream's cache is kept and reused by the next reply: same reply as from a fresh one.
    assert backend._plain_cache is not None and backend._plain_cache[1][: len(prompt)] == prompt
    again = _read_reply(backend, on, extra)
    backend._plain_cache = None
    assert again == contrasted == _read_reply(backend, on, extra)


def test_contrast_stream_is_the_frozen_model(tiny_backend, backend_name: str) -> None:
    """The plain side of the contrast never runs the memory hook (nor logs its activations): with the
    contrast on or off, the hook runs once per forward of the reply itself (the prompt, then each
    generated token); positive control: it is called at all."""
    from lmm.types import ExtraKV

    backend = tiny_backend(backend_name, "llama")
    calls = []
    backend.install_hook(1, lambda h, ctx: calls.append(ctx.phase) or h)
    try:
        statement = backend.formatter.standalone_turn("My cat is called Pepper.")
        cap = backend.capture(statement.ids, kv_layers=[0])
        extra = ExtraKV(key="s", layers={0: cap.kv[0]}, visible_from=statement.start)
        _read_reply(backend, DecodingConfig(max_tokens=6, memory_contrast=0.0), extra)
        off, off_tokens = len(calls), backend.last_stats.generated_tokens
        _read_reply(backend, DecodingConfig(max_tokens=6, memory_contrast=1.0, contrast_floor=1e-3), extra)
    finally:
        backend.remove_hook()
    assert off == 1 + off_tokens > 1
    assert len(calls) - off == 1 + backend.last_stats.generated_tokens
