"""Fact gates (`lmm.memory.fact_gate`) on the tiny models, for every module that has them (chaptered_bank's
chapters, lora_on_user's corrections, hash_gradient's tables, recurrent_state's readouts), both backends: a
consolidated statement gets gated parameters of its own; a prompt that does not pass its gate gets the plain
model's reply exactly (with a positive control: the same prompt with the fact forced open changes); the facts
survive a save and load, a rollback drops them, a failed load keeps them; the drift check does not generate
for prompts the module leaves alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fact_gate_helpers import ANSWER, FAST, QUESTIONS, consolidated, engine_for

from lmm.consolidation import GUARD_PROMPTS, GUARD_TRAIN, ConsolidationConfig, Consolidator
from lmm.engine import ChatEngine
from lmm.memory.base import RewriteContext, StateError
from lmm.memory.chaptered_bank import ChapteredBank
from lmm.memory.fact_gate import GENERAL_QUESTIONS
from lmm.memory.question_map import question_map

# each gated module, and a parameter of the seed's own (not of a fact)
GATED = {"chaptered_bank": "w_out", "lora_on_user": "B", "hash_gradient": "rows", "recurrent_state": "w_o"}


def reply(engine: ChatEngine, text: str) -> str:
    return engine.respond([{"role": "user", "content": text}]).assistant


@pytest.mark.parametrize("memory", GATED)
@pytest.mark.parametrize("name", ["torch", pytest.param("mlx_lm", marks=pytest.mark.mlx)])
def test_a_statement_gets_a_gated_fact_that_other_prompts_never_read(name: str, memory: str, tiny_backend,
                                                                     tmp_path: Path) -> None:
    be = tiny_backend(name)
    plain = engine_for(be, tmp_path, memory)
    unrelated = GUARD_PROMPTS[GUARD_TRAIN]  # held out: not used to set the threshold
    before = reply(plain, unrelated)
    plain.close()
    engine = engine_for(be, tmp_path, memory)
    module = consolidated(engine)
    assert module.fact_count == 1 and set(module.params) >= {f"fact0.{f}" for f in module.fact_fields}
    assert module.opened(QUESTIONS[0]) == [0]
    assert all(module.opened(t) == [] for t in GUARD_PROMPTS[:GUARD_TRAIN])  # the threshold is above them
    assert all(module.opened(t) == [] for t in GENERAL_QUESTIONS)
    closed = [t for t in GUARD_PROMPTS[GUARD_TRAIN:] if not module.affects(t)]
    assert unrelated in closed
    assert reply(engine, unrelated) == before
    assert module.summary()["facts"] == 1
    # positive control: the fact forced open changes the hidden states it was trained to change
    x = be.ops.asarray(np.random.default_rng(0).normal(0, 2, size=(1, 5, be.hidden_size)).astype(np.float32))
    module._open = [0]
    opened = be.ops.to_numpy(module.rewrite(x, RewriteContext(phase="generate", offset=0)))
    module._open = []
    shut = be.ops.to_numpy(module.rewrite(x, RewriteContext(phase="generate", offset=0)))
    assert np.array_equal(shut, be.ops.to_numpy(x)) and not np.allclose(opened, shut)
    engine.close()


@pytest.mark.parametrize("memory", GATED)
def test_facts_survive_a_reload_and_a_rollback_drops_them(memory: str, tiny_backend, tmp_path: Path) -> None:
    be = tiny_backend("torch")
    engine = engine_for(be, tmp_path, memory)
    empty = {k: np.array(v, copy=True) for k, v in engine.module.state_tensors().items()}
    module = consolidated(engine)
    path = tmp_path / "m.safetensors"
    engine.save_memory(path)
    saved = {k: np.array(v, copy=True) for k, v in module.state_tensors().items()}
    engine.close()
    again = engine_for(be, tmp_path, memory)
    again.load_memory(path)
    loaded = again.module
    assert isinstance(loaded, type(module)) and loaded.fact_count == 1
    assert all(np.array_equal(saved[k], v) for k, v in loaded.state_tensors().items())
    assert loaded.opened(QUESTIONS[0]) == [0]
    seed, last = GATED[memory], f"fact0.{module.fact_fields[-1]}"
    with pytest.raises(StateError, match=seed):
        loaded.load_state_tensors({k: v for k, v in saved.items() if k != f"param.{seed}"})
    assert loaded.fact_count == 1 and last in loaded.params  # a failed load keeps them
    with pytest.raises(StateError, match=last):  # a gate without its fact's tensors
        loaded.load_state_tensors({k: v for k, v in saved.items() if k != f"param.{last}"})
    assert loaded.fact_count == 1 and last in loaded.params
    loaded.load_state_tensors(empty)  # what the drift check's rollback does
    assert loaded.fact_count == 0 and not any(k.startswith("fact") for k in loaded.params)
    assert loaded.opened(QUESTIONS[0]) == []
    again.close()


@pytest.mark.parametrize("memory", GATED)
def test_drift_check_generates_only_for_prompts_the_module_may_change(memory: str, tiny_backend,
                                                                      tmp_path: Path) -> None:
    be = tiny_backend("torch")
    engine = engine_for(be, tmp_path, memory)
    module = consolidated(engine)
    teacher = Consolidator(be, ConsolidationConfig(**FAST))
    teacher.guards()
    calls: list[int] = []
    original = be.generate

    def counting(*args: Any, **kwargs: Any):
        calls.append(1)
        return original(*args, **kwargs)

    be.generate = counting
    try:
        skipped = teacher.drift(module)
        assert skipped == 0.0 and len(calls) == sum(module.affects(t) for t in GUARD_PROMPTS[GUARD_TRAIN:])
        calls.clear()
        module.seed_trained = lambda: True  # positive control: the seed's update ran, any reply may change
        teacher.drift(module)
        assert len(calls) == len(GUARD_PROMPTS) - GUARD_TRAIN
    finally:
        be.generate = original
        engine.close()


def empty_chapters(engine: ChatEngine, *chapters: tuple[list[str], str]) -> ChapteredBank:
    """Fact chapters opened for (questions, statement) pairs and left untrained: their gates only."""
    module = engine.module
    assert isinstance(module, ChapteredBank)
    for questions, statement in chapters:
        with module.consolidating(questions, GUARD_PROMPTS[:GUARD_TRAIN], statement=statement):
            pass
    return module


def test_open_chapters_are_ranked_by_cosine_not_by_margin(tiny_backend, tmp_path: Path) -> None:
    """Chapter 0 passes its low threshold by more; chapter 1 is nearer the message: 1 is read first."""
    be = tiny_backend("torch")
    engine = engine_for(be, tmp_path)
    module = empty_chapters(engine, (QUESTIONS, ""), (QUESTIONS[:1], ""))
    center = be.ops.to_numpy(module.buffers["fact_center"])
    feature = module._state(QUESTIONS[0]) - center
    feature /= np.linalg.norm(feature)
    near, far = feature, feature + 0.6 * np.roll(feature, 1)
    route = np.stack([far / np.linalg.norm(far), near]).astype(np.float32)
    module.buffers["fact_route"] = be.ops.asarray(route)
    module.buffers["fact_threshold"] = be.ops.asarray(np.array([-1.0, 0.5], np.float32))
    assert module.opened(QUESTIONS[0]) == [1]  # fact_top_k 1: only the nearer one
    module.cfg.fact_top_k = 2
    assert module.opened(QUESTIONS[0]) == [1, 0]
    module.buffers["fact_threshold"] = be.ops.asarray(np.array([-1.0, 1.5], np.float32))  # control: 1 shut
    assert module.opened(QUESTIONS[0]) == [0]
    engine.close()


def test_the_statement_and_its_predicted_question_join_the_route(tiny_backend, tmp_path: Path) -> None:
    be = tiny_backend("torch")
    engine = engine_for(be, tmp_path)
    module = empty_chapters(engine, (QUESTIONS, ANSWER), (QUESTIONS, ""))  # control: no statement given
    center = be.ops.to_numpy(module.buffers["fact_center"])
    routes = be.ops.to_numpy(module.buffers["fact_route"])
    said = module._state(ANSWER)
    predicted = question_map(be.view(), engine.layer).predict(said)
    expected = np.mean([*(module._state(t) for t in QUESTIONS), said, predicted], axis=0) - center
    np.testing.assert_allclose(routes[0], expected / np.linalg.norm(expected), atol=1e-5)
    assert not np.allclose(routes[0], routes[1], atol=1e-3)
    engine.close()
    # fact_map off: the statement without its predicted question (and so another route)
    engine = engine_for(be, tmp_path, fact_map="false")
    plain = empty_chapters(engine, (QUESTIONS, ANSWER))
    without = np.mean([*(plain._state(t) for t in QUESTIONS), said], axis=0) - center
    route = be.ops.to_numpy(plain.buffers["fact_route"])[0]
    np.testing.assert_allclose(route, without / np.linalg.norm(without), atol=1e-5)
    assert not np.allclose(route, routes[0], atol=1e-3)
    engine.close()
