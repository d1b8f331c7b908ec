"""trace_bank and the backends' attention memory on the tiny random models, both backends.

Mechanism: extra keys/values are seen only from `visible_from` on, chunked prefill equals one
pass with them (mask alignment in both backends, every family), and with traces read by every
layer the logits equal the model with the statement in context at the same positions (torch,
explicit positions and mask; the words at the chat's start, or the whole user turn placed before
the chat). Module: fresh is the identity, a prompt that routes nowhere is bit-identical to the
plain model (also right after one that routed), save/load reproduces replies (int8 and float16
states), several traces read within a budget, the sentence split and the write gate's probe, and
torch/mlx_lm agreement. The store (eviction, supersession, upgrades, items): `test_trace_store.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from trace_bank_helpers import (
    BACKENDS,
    FACT,
    OTHER,
    UNRELATED,
    bank,
    digest,
    engine,
    plain_reply,
    prompt_logits,
    random_extra,
    reply,
    teach,
)

from lmm.memory.trace_bank import TraceBankConfig
from lmm.memory.trace_gate import fit_probe, is_question, sentences
from lmm.memory.trace_routing import Support
from lmm.memory.traces import storage_dtype
from lmm.testing import FAMILIES

# --- the write gate and the config -------------------------------------------------------------------

def test_sentences_split_at_sentence_ends_only() -> None:
    assert sentences("Hi! I am Bob. What is up?") == ["Hi!", "I am Bob.", "What is up?"]
    assert sentences("My teacher is Mrs. Okonkwo.") == ["My teacher is Mrs. Okonkwo."]
    assert sentences("It was mango... no wait, lychee.") == ["It was mango... no wait, lychee."]
    assert sentences("J. R. Smith lives here. So do I.") == ["J. R. Smith lives here.", "So do I."]
    assert sentences("我很好。你呢？") == ["我很好。", "你呢？"]
    assert is_question("Where do I live?") and is_question("Is it \u201cRex?\u201d") and not is_question("I live here.")


def test_probe_separates_the_two_classes_it_was_fitted_on() -> None:
    """The gate's probe on synthetic states: classes apart along one axis among noisy others."""
    rng = np.random.default_rng(0)
    inform, other = rng.normal(0, 1, (40, 16)), rng.normal(0, 1, (40, 16))
    inform[:, 3] += 4.0
    probe = fit_probe(inform, other)
    assert (probe.score(inform) > 0).mean() > 0.9 and (probe.score(other) < 0).mean() > 0.9
    assert np.argmax(np.abs(probe.direction)) == 3
    fresh = rng.normal(0, 1, (200, 16))
    fresh[:100, 3] += 4.0
    assert ((probe.score(fresh) > 0) == (np.arange(200) < 100)).mean() > 0.9


@pytest.mark.parametrize("field, value", [
    ("threshold", 1.5), ("threshold", float("nan")), ("start_layer", -2), ("routing_layer", -2), ("max_traces", 0),
    ("max_trace_tokens", 3), ("dedupe", 1.5), ("dtype", "int3"), ("sentence_threshold", 1.5),
    ("sentence_layer", -2), ("max_query_sentences", -1), ("read_gain", 0), ("shortlist", 0), ("supersede_gap", -1.0),
])
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        TraceBankConfig(**{field: value})


# --- the attention-memory mechanism -------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_extra_kv_visibility_and_chunked_prefill(name: str, family: str, tiny_backend) -> None:
    """Positions before `visible_from` are untouched; later ones change; one pass == chunks == decode steps."""
    be = tiny_backend(name, family)
    story = "Tell me a story about the small robot by the sea."
    ids = be.formatter.generation_ids([{"role": "user", "content": story}])
    n_layers = be.num_layers
    visible_from = 5
    plain = be.ops.to_numpy(be.forward(ids, be.new_cache(), "generate"))
    be.set_extra_kv(random_extra(be, list(range(n_layers // 2, n_layers)), n=7, visible_from=visible_from))
    try:
        one = be.ops.to_numpy(be.forward(ids, be.new_cache(), "generate"))
        cache = be.new_cache()
        parts = [be.forward(ids[:3], cache, "generate"), be.forward(ids[3:11], cache, "generate")]
        parts += [be.forward([t], cache, "generate") for t in ids[11:]]
        chunked = np.concatenate([be.ops.to_numpy(p) for p in parts])
    finally:
        be.set_extra_kv(None)
    np.testing.assert_array_equal(one[:visible_from], plain[:visible_from])
    assert np.abs(one[visible_from:] - plain[visible_from:]).max() > 1e-3
    np.testing.assert_allclose(chunked, one, rtol=1e-4, atol=1e-4)
    again = be.ops.to_numpy(be.forward(ids, be.new_cache(), "generate"))
    np.testing.assert_array_equal(again, plain)


@pytest.mark.parametrize("read_role", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # gemma3's sliding window needs a second mask
def test_trace_read_by_every_layer_equals_the_statement_in_context(family: str, read_role: bool,
                                                                   tiny_backend) -> None:
    """start_layer=0: the prompt's logits equal one forward with an explicit mask and positions.
    read_role=False: [system, statement turn, prompt turn], the prompt restarting right after the system
    prompt and seeing only the statement's words (the words read at the chat's first positions).
    read_role=True: [system', statement turn, system, prompt turn] where system' and the statement turn
    sit m positions earlier (m: the turn's length, so the turn ends where the chat's first turn starts),
    and the prompt sees the whole statement turn and the real system prompt, not system'."""
    import torch

    be = tiny_backend("torch", family)
    eng = engine(be, start_layer=0, threshold=0.99, sentence_threshold=1.0, read_role=read_role, read_gain=1)
    try:
        teach(eng, FACT)
        trace = bank(eng).traces[0]
        ids = be.formatter.generation_ids([{"role": "user", "content": FACT}])  # routes to its own trace
        with_trace = prompt_logits(be, FACT)
        assert bank(eng).last_route is not None and bank(eng).last_route["retrieved"]
        turn, n_sys, content = bank(eng)._turn(FACT)
        assert ids[:n_sys] == be.formatter._default_system_ids()
        assert trace.token_ids.tolist() == [turn[i] for i in content]  # compact: only the statement's ids
        m = len(turn) - n_sys
        if read_role:
            seq = turn + ids  # system', statement turn, then the chat: system, prompt turn
            positions = list(range(-m, n_sys)) + list(range(len(ids)))
            q0 = len(turn)
            read = list(range(n_sys, q0))
        else:
            seq = ids[:n_sys] + turn[n_sys:] + ids[n_sys:]
            positions = list(range(n_sys + m)) + list(range(n_sys, len(ids)))
            q0 = n_sys + m
            read = content
        t = len(seq)
        allowed = np.tril(np.ones((t, t), dtype=bool))
        chat = list(range(q0, t))
        allowed[q0:, :q0] = False
        if read_role:
            allowed[q0 + n_sys:, read] = True  # the chat after its system prompt sees the statement turn
        else:
            allowed[q0:, :n_sys] = True  # the chat's own system prompt
            allowed[q0:, read] = True  # ... and the statement's words
        model = be.model
        mask = torch.where(torch.from_numpy(allowed), 0.0, torch.finfo(torch.float32).min)[None, None]
        be.set_extra_kv(None)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq]), position_ids=torch.tensor([positions]),
                        attention_mask=mask.to(model.dtype)).logits[0].float().numpy()
        expected = out[chat] if read_role else np.concatenate([out[:n_sys], out[q0:]])
        np.testing.assert_allclose(with_trace, expected, rtol=1e-4, atol=1e-4)
    finally:
        eng.close()


# --- the module -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_module_is_exactly_the_identity(name: str, family: str, tiny_backend) -> None:
    be = tiny_backend(name, family)
    plain = prompt_logits(be, FACT)
    plain_tokens = plain_reply(be, FACT)
    eng = engine(be)
    try:
        np.testing.assert_array_equal(prompt_logits(be, FACT), plain)
        assert reply(eng, FACT) == plain_tokens
        assert be.extra_kv is None
    finally:
        eng.close()


@pytest.mark.parametrize("name", BACKENDS)
def test_unrouted_prompt_is_bit_identical_even_after_a_routed_one(name: str, tiny_backend) -> None:
    be = tiny_backend(name)
    plain_logits = prompt_logits(be, UNRELATED)
    plain_tokens = plain_reply(be, UNRELATED)
    routed_plain = plain_reply(be, FACT)
    eng = engine(be, threshold=0.99, sentence_threshold=0.99)
    try:
        teach(eng, FACT)
        routed = reply(eng, FACT)
        assert bank(eng).last_route["retrieved"] and be.extra_kv is not None
        assert routed != routed_plain, "the trace should change the reply of the tiny model"
        # a chat turn that routes nowhere right after: the session cache must not carry the trace
        assert reply(eng, UNRELATED) == plain_tokens
        assert not bank(eng).last_route["retrieved"] and be.extra_kv is None
        np.testing.assert_array_equal(prompt_logits(be, UNRELATED), plain_logits)
    finally:
        eng.close()


@pytest.mark.parametrize("name", BACKENDS)
def test_multi_turn_chat_matches_a_fresh_prefill(name: str, tiny_backend) -> None:
    """Turn 2 reuses the session cache when the retrieval did not change, and drops it when it did."""
    be = tiny_backend(name)
    eng = engine(be, threshold=0.99, sentence_threshold=0.99)
    try:
        teach(eng, FACT)
        eng.learning = False
        eng.reset_chat()
        for text in (FACT, FACT, UNRELATED, FACT):
            eng.ask(text)
            history = eng.chat_messages()
            last = eng.last_turn.assistant
            # the same prompt from scratch with the same retrieval
            fresh = engine(be, threshold=0.99, sentence_threshold=0.99)
            fresh.module.load_state_tensors(eng.module.state_tensors())
            fresh.messages = [dict(m) for m in history[:-2]]
            fresh.learning = False
            assert fresh.ask(text).assistant == last
            fresh.close()
    finally:
        eng.close()


@pytest.mark.parametrize("dtype", ["int4", "int8", "float16"])
@pytest.mark.parametrize("name", BACKENDS)
def test_save_load_in_a_new_engine_reproduces_replies(name: str, dtype: str, tiny_backend,
                                                      tmp_path: Path) -> None:
    be = tiny_backend(name)
    eng = engine(be, dtype=dtype)
    try:
        for text in (FACT, "Why is the sky blue?", OTHER):
            eng.ask(text)
        assert len(bank(eng).traces) == 2
        state = eng.module.state_tensors()
        assert state["buffer.route"].dtype == storage_dtype(dtype) and int(state["buffer.trace_format"][0]) == 2
        assert ("buffer.route_scale" in state) == (dtype in ("int4", "int8"))
        assert "buffer.keys" not in state  # compact: keys/values are rebuilt when read
        path = eng.save_memory(tmp_path / "tb.safetensors")
        eng.learning = False
        expected = [reply(eng, q) for q in ("What is my name?", "What is my cat called?", UNRELATED)]
    finally:
        eng.close()
    other = engine(be, dtype=dtype)
    try:
        other.load_memory(path)
        assert digest(other.module.state_tensors()) == digest(state)
        other.learning = False
        assert [reply(other, q) for q in ("What is my name?", "What is my cat called?", UNRELATED)] == expected
    finally:
        other.close()


@pytest.mark.mlx
def test_torch_and_mlx_agree(tiny_backend) -> None:
    results = {}
    for name in ("torch", "mlx_lm"):
        be = tiny_backend(name)
        eng = engine(be, threshold=0.99, sentence_threshold=0.99)
        try:
            replies = [eng.ask(t).assistant for t in (FACT, "Why is the sky blue?", OTHER)]
            state = eng.module.state_tensors()
            routed = prompt_logits(be, FACT)
            assert bank(eng).last_route["retrieved"]
            results[name] = (replies, state, routed)
        finally:
            eng.close()
    (r_t, s_t, l_t), (r_m, s_m, l_m) = results["torch"], results["mlx_lm"]
    assert r_t == r_m
    assert sorted(s_t) == sorted(s_m)
    for key in s_t:
        assert s_t[key].dtype == s_m[key].dtype and s_t[key].shape == s_m[key].shape, key
        np.testing.assert_allclose(s_t[key], s_m[key], rtol=1e-4, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(l_t, l_m, rtol=1e-3, atol=1e-3)


def test_learning_needs_a_backend() -> None:
    from lmm.memory import create_memory

    module = create_memory("trace_bank", hidden_size=8, ops=None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="attach"):
        module.write([{"role": "user", "content": FACT}], 0)


@pytest.mark.parametrize("max_sentences", [0, 4])
def test_a_sentence_inside_a_longer_message_routes_on_its_own(max_sentences: int, tiny_backend) -> None:
    """The stored statement as one sentence of a longer message: read when the message's sentences
    route separately (max_query_sentences > 0), not when only the whole message is scored."""
    be = tiny_backend("torch")
    eng = engine(be, threshold=0.99, sentence_threshold=0.99, max_query_sentences=max_sentences)
    try:
        teach(eng, FACT)
        message = f"{UNRELATED} Tell me a long story about a dragon and a lighthouse. {FACT}"
        tokens, sentences = bank(eng).scores(message)
        whole_tokens, whole_sentences = bank(eng).scores(FACT) if max_sentences else (tokens, sentences)
        reply(eng, message)
        assert bank(eng).last_route["retrieved"] == (max_sentences > 0)
        if max_sentences:
            assert tokens[0] == pytest.approx(whole_tokens[0]) and sentences[0] == pytest.approx(whole_sentences[0])
    finally:
        eng.close()


@pytest.mark.parametrize("max_read, budget, spread, expected", [
    (3, 96, 100.0, 3), (2, 96, 100.0, 2), (3, 96, 0.0, 1), (3, 12, 100.0, 1)])
def test_a_reply_reads_the_best_few_traces_within_a_budget(max_read: int, budget: int, spread: float,
                                                           expected: int, tiny_backend) -> None:
    """Every candidate past `relevance` (at -100: all), the best first, is read until `max_read`, the
    token `budget` or a relevance `spread` below the best stops it; the read turn holds them oldest first."""
    be = tiny_backend("torch")
    eng = engine(be, relevance=-100.0, margin_weight=1.0, max_read=max_read, read_budget=budget,
                 read_spread=spread, check_margin=-2.0)
    try:
        for text in (FACT, OTHER, "I work as a baker in Lyon."):
            teach(eng, text)
        chosen = bank(eng).select("Where do I work?")
        assert len(chosen) == expected and chosen == sorted(chosen)
        assert len(chosen) == 1 or sum(len(bank(eng).traces[i].token_ids) for i in chosen) <= budget
        reply(eng, "Where do I work?")
        assert len(bank(eng).last_route["traces"]) == expected
    finally:
        eng.close()


def test_candidates_below_check_margin_cost_no_forward(tiny_backend) -> None:
    """The second stage checks only first-stage candidates past `check_margin`: with none, it runs no
    forward and nothing is read; the positive control (-2: every candidate) checks and reads both."""
    be = tiny_backend("torch")
    eng = engine(be, relevance=-100.0, margin_weight=1.0, read_spread=100.0)
    try:
        for text in (FACT, OTHER):
            teach(eng, text)
        checked: list[int] = []
        real = bank(eng).relevance

        def spy(traces, text):
            checked.append(len(traces))
            return real(traces, text)

        bank(eng).relevance = spy  # type: ignore[method-assign]
        bank(eng).cfg.check_margin = -2.0
        assert len(bank(eng).select("Where do I live?")) == 2 and checked[-1] == 2
        bank(eng).cfg.check_margin = 2.0  # past any margin (a difference of cosines from thresholds)
        bank(eng)._logprobs.clear()
        assert bank(eng).select("Where do I live?") == [] and checked[-1] == 0
    finally:
        eng.close()


def test_uncovered_is_the_least_explained_token_of_the_best_explained_sentence(tiny_backend) -> None:
    """A token counts when the statement makes it likelier by less than `cover_gain`; each sentence's
    first token never counts; a message of several sentences is as covered as its best sentence."""
    eng = engine(tiny_backend("torch"), cover_gain=4.0)
    try:
        surprisal = np.array([9.0, 2.0, 8.0, 1.0, 9.0, 1.0, 1.0])
        gain = np.array([0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0])
        assert bank(eng)._uncovered(surprisal, gain, [0]) == 9.0  # token 4; token 2 is explained by its gain
        assert bank(eng)._uncovered(surprisal, gain, [0, 4]) == 1.0  # the second sentence: 5 and 6 only
        assert bank(eng)._uncovered(surprisal[:4], gain[:4], [0]) == 2.0  # token 2 explained ...
        assert bank(eng)._uncovered(surprisal[:4], np.zeros(4), [0]) == 8.0  # ... control: without its gain
    finally:
        eng.close()


def test_sentence_starts_follow_the_first_stage_split(tiny_backend) -> None:
    """The coverage rule's sentences are `sentences`': one sentence, one start; "Mrs." ends none."""
    eng = engine(tiny_backend("torch"))
    try:
        b = bank(eng)
        two = "I met Mrs. Okafor today. Where do I work?"
        for text, parts in (("Where do I work?", ["Where do I work?"]),
                            (two, ["I met Mrs. Okafor today.", "Where do I work?"])):
            ids, _, content = b._turn(text)
            tokens = [ids[i] for i in content]
            starts = b._sentence_starts(tokens, text)
            ends = [*starts[1:], len(tokens)]
            pieces = [b._model.decode(tokens[a:z]).strip() for a, z in zip(starts, ends, strict=True)]
            assert pieces == parts == sentences(text)
    finally:
        eng.close()


@pytest.mark.parametrize("uncovered, read", [(6.0, True), (7.0, False)])
def test_a_statement_leaving_a_token_unexplained_is_not_read(uncovered: float, read: bool, tiny_backend) -> None:
    """Past the relevance threshold, a candidate is still not read when the message keeps a token the
    statement does not explain past `cover_surprisal` (the first row is the positive control)."""
    eng = engine(tiny_backend("torch"), relevance=0.5, margin_weight=0.0, check_margin=-2.0, cover_surprisal=6.5)
    try:
        teach(eng, FACT)
        bank(eng).relevance = lambda traces, text: [Support(1.0, uncovered) for _ in traces]  # type: ignore[method-assign]
        assert bool(bank(eng).select("Where do I live?")) is read
    finally:
        eng.close()


def test_read_gain_repeats_each_trace_token(tiny_backend) -> None:
    be = tiny_backend("torch")
    eng = engine(be, read_gain=3)
    try:
        teach(eng, FACT)
        trace = bank(eng).traces[0]
        keys, values = bank(eng)._extra([trace]).layers[0]
        ids, start, _ = bank(eng)._turn(FACT)
        n = len(ids) - start  # the whole user turn (read_role=True)
        assert keys.shape[2] == values.shape[2] == 3 * n
        np.testing.assert_array_equal(keys[0, :, :n].numpy(), keys[0, :, 2 * n:].numpy())
    finally:
        eng.close()


def test_the_token_level_runs_on_the_whole_turn_shortlist_only(tiny_backend) -> None:
    """With shortlist=1 only the trace of best whole-turn cosine gets a token-level score, and its
    score is the one it gets when every trace is scored (the control: shortlist past the count)."""
    be = tiny_backend("torch")
    texts = [FACT, OTHER, "I work as a baker in Lyon."]
    scored = {}
    for shortlist in (1, 10):
        eng = engine(be, shortlist=shortlist, dedupe=1.0)
        try:
            for text in texts:
                teach(eng, text)
            scored[shortlist] = bank(eng).scores("Where do I live and what is my name?")
        finally:
            eng.close()
    (tok1, whole1), (tok10, whole10) = scored[1], scored[10]
    best = int(np.argmax(whole10))
    np.testing.assert_allclose(whole1, whole10)
    assert np.isfinite(tok10).all() and np.isfinite(tok1).sum() == 1 and np.isfinite(tok1[best])
    np.testing.assert_allclose(tok1[best], tok10[best], rtol=1e-6)
