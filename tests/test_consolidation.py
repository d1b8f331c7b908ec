"""Consolidation (`lmm.consolidation`) on tiny models: every gradient module learns the teacher's
answers through the shared learner on both backends, the drift check undoes what moves other
replies (with its positive control), and the engine, REPL command and benchmark rows wire it in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.bench.runner import select_modules
from lmm.commands import run_command
from lmm.consolidation import ConsolidationConfig, Consolidator
from lmm.engine import ChatEngine, EngineConfig
from lmm.memory import get_memory_spec, memory_names
from lmm.memory.base import GradientMemory
from lmm.session import ChatSession
from lmm.teacher import copies_a_shot, is_forward, named_words, uses_statement

GRADIENT = [n for n in memory_names() if issubclass(get_memory_spec(n).module_cls, GradientMemory)]
# Strong enough to move a random tiny model in a few updates; the defaults are tuned on SmolLM2.
FAST = dict(lr=0.05, steps=3, epochs=3, guards_per_step=1, guard_tokens=4, drift_tokens=4, max_drift=1.0)


def engine_for(backend, memory: str, tmp_path: Path, **overrides) -> ChatEngine:
    config = EngineConfig(memory=memory, activation_log_path=tmp_path / "log.jsonl",
                          decoding=DecodingConfig(max_tokens=6), **overrides)
    return ChatEngine(config, backend=backend)


def state(engine: ChatEngine) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in engine.module.state_tensors().items()}


def test_gradient_modules_are_the_four_seeds() -> None:
    assert sorted(GRADIENT) == ["chaptered_bank", "hash_gradient", "lora_on_user", "recurrent_state"]


@pytest.mark.parametrize("memory", GRADIENT)
def test_every_gradient_module_learns_the_answers(memory: str, backend_name: str, tiny_backend,
                                                  tmp_path: Path) -> None:
    # The answers alone (hash_gradient also trains the statement's own tokens by default: tested below).
    engine = engine_for(tiny_backend(backend_name), memory, tmp_path, memory_options={"fact_statement_weight": "0"})
    teacher = Consolidator(engine.backend, ConsolidationConfig(**FAST))
    examples = [teacher.example("Where is the red kite?", "The red kite is in the shed."),
                teacher.example("What is in the shed?", "The red kite is in the shed.")]
    before = state(engine)
    summary = teacher.learn(engine.module, engine.hook, examples, statement="The red kite is in the shed.")
    engine.close()
    assert summary.updates == 6 and not summary.rolled_back
    assert summary.loss_after < summary.loss
    assert 0.0 <= summary.drift <= 1.0
    assert any(not np.array_equal(before[k], v) for k, v in state(engine).items() if k in before)


def test_statement_example_targets_its_surprising_tokens(backend_name: str, tiny_backend, tmp_path: Path) -> None:
    engine = engine_for(tiny_backend(backend_name), "hash_gradient", tmp_path)
    teacher = Consolidator(engine.backend, ConsolidationConfig(**FAST))
    statement = "My locker code is 4417 and my locker is blue."
    own = teacher.statement_example(statement, engine.hook)
    assert own is not None
    ex = own[0]
    turn = engine.backend.formatter.standalone_turn(statement)
    assert ex.targets and set(ex.positions) < {i - 1 for i in turn.content}
    assert all(ex.ids[p + 1] == t for p, t in zip(ex.positions, ex.targets, strict=True))
    with engine.backend.frozen():  # the seeds' selection: the content tokens above the statement's mean CE
        logits = engine.backend.forward(ex.ids, engine.backend.new_cache(), "score", keep=[i - 1 for i in turn.content])
    ops = engine.backend.ops
    ce = ops.to_numpy(ops.cross_entropy(logits, ops.asarray([ex.ids[i] for i in turn.content], dtype="int32")))
    assert ex.positions == [turn.content[k] - 1 for k in np.flatnonzero(ce > ce.mean())]
    engine.close()


@pytest.mark.parametrize("weight", ["0", "1"])
def test_statement_weight_adds_an_update_on_the_statement(weight: str, tiny_backend, tmp_path: Path) -> None:
    engine = engine_for(tiny_backend("torch"), "hash_gradient", tmp_path,
                        memory_options={"fact_statement_weight": weight})
    teacher = Consolidator(engine.backend, ConsolidationConfig(**FAST))
    statement = "The red kite is in the shed."
    examples = [teacher.example("Where is the red kite?", "The red kite is in the shed.")]
    with engine.module.consolidating([e.question for e in examples], (), statement=statement):
        own = teacher.statement_example(statement, engine.hook)
        assert own is not None
        before = teacher._scored(engine.hook, [own[0]])[0]
        summary = teacher.learn(engine.module, engine.hook, examples, statement=statement)
        after = teacher._scored(engine.hook, [own[0]])[0]
    engine.close()
    # Weight 0, the control: no update on the statement, so the count tells the two apart.
    assert summary.updates == FAST["epochs"] * (1 + (weight == "1"))
    assert len(summary.examples) == 1  # the statement is not reported as a question learned
    if weight == "1":
        assert after < before


def test_drift_check_undoes_a_consolidation(tiny_backend, tmp_path: Path) -> None:
    engine = engine_for(tiny_backend("torch"), "lora_on_user", tmp_path)
    before = state(engine)
    example = ("Where is the red kite?", "The red kite is in the shed.")

    def run(max_drift: float):
        teacher = Consolidator(engine.backend, ConsolidationConfig(**{**FAST, "lr": 0.5, "max_drift": max_drift}))
        return teacher.learn(engine.module, engine.hook, [teacher.example(*example)],
                             restore=lambda: engine.module.load_state_tensors(before))

    undone = run(0.0)
    assert undone.rolled_back and undone.drift > 0.0
    assert all(np.array_equal(before[k], v) for k, v in state(engine).items())
    kept = run(1.0)  # positive control: the same consolidation, allowed to drift, changes the module
    engine.close()
    assert not kept.rolled_back
    assert any(not np.array_equal(before[k], v) for k, v in state(engine).items())


def test_answers_must_use_the_statement() -> None:
    statement = "My aunt Greta lives in Bergen."
    assert uses_statement(statement, "Where does my aunt live?", "Your aunt Greta lives in Bergen.")
    assert not uses_statement(statement, "Does my aunt Greta live in Bergen?", "No, she does not.")
    assert not uses_statement(statement, "Who lives in Bergen?", "Someone lives in Bergen.")


def test_forward_questions_leave_out_the_statements_names_and_numbers() -> None:
    statement = "Hi! My niece is named Anouk and her locker is 417."
    assert named_words(statement) == {"anouk", "417"}  # "Hi" and "My" open their sentences
    assert is_forward(statement, "What is my niece's name?")
    assert not is_forward(statement, "What is Anouk's name?")
    assert not is_forward(statement, "Which locker is 417?")
    assert is_forward("I love badminton.", "Which sport do I play?")  # nothing named: every question is


def test_answers_that_copy_a_few_shot_name_are_caught() -> None:
    statement = "My favourite film is Spirited Away."
    assert copies_a_shot("It is about a girl named Rosalind.", statement, "What is my favourite film?")
    assert copies_a_shot("Does my neighbour Rosalind like it?", statement)
    assert not copies_a_shot("Your favourite film is Spirited Away.", statement, "What is my favourite film?")
    assert not copies_a_shot("Your name is Rosalind.", "I'm Rosalind.", "What is my name?")  # the user's own


@pytest.mark.parametrize("field,value", [("questions", 0), ("forward_tries", -1), ("epochs", 0),
                                         ("max_drift", 1.5), ("lr", -1.0), ("guard_weight", -0.1),
                                         ("temperature", 0.0), ("drift_tokens", 99)])
def test_config_names_the_bad_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ConsolidationConfig(**{field: value})


def test_engine_consolidates_after_the_reply_and_logs_it(tiny_backend, tmp_path: Path) -> None:
    engine = engine_for(tiny_backend("torch"), "lora_on_user", tmp_path, consolidate=True,
                        background_updates=True)
    turn = engine.ask("The red kite is in the shed.")
    engine.close()
    update = turn.update
    assert update is not None and update.learner == "consolidate" and update.note
    assert update.token_losses == []  # the seed's surprise update did not run
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    consolidations = [r for r in records if r["kind"] == "consolidation"]
    # A random tiny model's gate may keep the sentence or not; what it keeps is logged with its time.
    assert len(consolidations) == len(update.consolidated)
    for record in consolidations:
        assert record["statement"] == "The red kite is in the shed." and record["update_seconds"] >= 0


def test_without_the_flag_the_seed_update_runs(tiny_backend, tmp_path: Path) -> None:
    engine = engine_for(tiny_backend("torch"), "lora_on_user", tmp_path)
    turn = engine.ask("The red kite is in the shed.")
    engine.close()
    assert turn.update is not None and turn.update.learner == "surprise" and turn.update.token_losses


@pytest.mark.parametrize("memory", ["identity", "trace_bank"])
def test_modules_of_other_kinds_keep_their_learner(memory: str, tiny_backend, tmp_path: Path) -> None:
    notices: list[str] = []
    config = EngineConfig(memory=memory, activation_log_path=None, decoding=DecodingConfig(max_tokens=4),
                          consolidate=True)
    engine = ChatEngine(config, backend=tiny_backend("torch"), on_notice=notices.append)
    assert not engine.consolidating and any("gradient modules" in n for n in notices)
    turn = engine.ask("The red kite is in the shed.")
    engine.close()
    assert turn.update is not None and turn.update.learner != "consolidate"


def test_consolidate_command(tiny_backend, tmp_path: Path) -> None:
    engine = engine_for(tiny_backend("torch"), "lora_on_user", tmp_path, background_updates=False)
    session = ChatSession(engine, save_path=tmp_path / "m.safetensors")
    session.start()
    engine.ask("The red kite is in the shed.")
    on = run_command(session, "/consolidate")
    assert not on.error and "1 earlier message" in on.text and engine.consolidating
    assert engine.last_update is not None and engine.last_update.learner == "consolidate"
    assert "off" in run_command(session, "/consolidate off").text and not engine.consolidating
    assert run_command(session, "/consolidate sideways").error
    session.close()
    engine.close()


def test_bench_rows_with_consolidation() -> None:
    assert select_modules(["lora_on_user+consolidate"]) == ["lora_on_user+consolidate"]
    for bad in ("trace_bank+consolidate", "lora_on_user+distil"):
        with pytest.raises(ValueError, match="consolidate"):
            select_modules([bad])


def test_options_from_strings() -> None:
    config = ConsolidationConfig.from_strings({"max_drift": "0.2", "questions": "2"})
    assert config.max_drift == 0.2 and config.questions == 2
    with pytest.raises(ValueError, match="unknown consolidation option 'nope'"):
        ConsolidationConfig.from_strings({"nope": "1"})
    with pytest.raises(ValueError, match="questions"):
        ConsolidationConfig.from_strings({"questions": "many"})
