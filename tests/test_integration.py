"""The embedded SmolLM2-135M-Instruct, end to end (converted once into artifacts/models)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmm.backends import DecodingConfig, load_backend
from lmm.engine import ChatEngine, EngineConfig
from lmm.state import read_state

pytestmark = pytest.mark.integration
FACT = "My best friend is called Zorblat and he lives in Reykjavik."


@pytest.mark.parametrize("backend_name", ["torch", pytest.param("mlx_lm", marks=pytest.mark.mlx)])
def test_identity_hook_is_token_identical(embedded, backend_name: str, tmp_path: Path) -> None:
    backend = load_backend(backend_name, embedded.path, embedded.model_id)
    decoding = DecodingConfig(max_tokens=24)
    prompts = ["What is the capital of France?", "Write one sentence about the sea."]
    plain = [list(backend.generate(backend.formatter.generation_ids([{"role": "user", "content": p}]), decoding))
             for p in prompts]
    engine = ChatEngine(EngineConfig(memory="identity", activation_log_path=None, decoding=decoding),
                        backend=backend)
    hooked = []
    for p in prompts:
        engine.reset_chat()
        hooked.append(list(backend.generate(backend.formatter.generation_ids([{"role": "user", "content": p}]),
                                            decoding)))
    assert engine.hook.calls > 0
    assert hooked == plain
    engine.close()


def test_teach_save_load_in_new_process(embedded, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    state = tmp_path / "lora.safetensors"
    engine = ChatEngine(EngineConfig(backend="torch", memory="lora_on_user", activation_log_path=log,
                                     decoding=DecodingConfig(max_tokens=32)))
    turn = engine.ask(FACT)
    assert turn.update.loss_after < turn.update.loss
    learned = "".join(turn.update.selected_tokens)
    assert "bl" in learned or "Rey" in learned  # pieces of the rare words are the surprising ones
    engine.save_memory(state)
    saved = engine.module.state_tensors()
    engine.close()

    script = (
        "import json, sys, numpy as np\n"
        "from lmm.engine import ChatEngine, EngineConfig\n"
        "e = ChatEngine(EngineConfig(backend='torch', memory='lora_on_user', activation_log_path=None))\n"
        f"e.load_memory({str(state)!r})\n"
        "np.savez(sys.argv[1], **e.module.state_tensors())\n"
    )
    out = tmp_path / "loaded.npz"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=300)
    loaded = dict(np.load(out))
    assert set(loaded) == set(saved)
    for key in saved:
        np.testing.assert_array_equal(loaded[key], saved[key])
    header, _ = read_state(state)
    assert header.model_id == "SmolLM2-135M-Instruct" and header.update_count == 1

    records = [json.loads(line) for line in log.read_text().splitlines()]
    post = [r for r in records if r["kind"] == "update" and r["stage"] == "post_hooks"]
    assert len(post) == 1 and post[0]["user_text"] == FACT
    decoded = "".join(post[0]["user_response_token_loss_by_decoded_token"])
    assert "SmolLM" not in decoded and "Hugging" not in decoded  # the template's system prompt is not learned


def test_trace_bank_decides_with_the_model(embedded) -> None:
    """On the real model: the write gate keeps statements in any person and skips small talk and
    questions; the second routing stage reads the right statement for a question in other words and
    nothing for an unrelated prompt (whose reply stays the plain model's). Positive control: with the
    second stage's threshold removed the unrelated prompt does read something."""
    backend = load_backend("torch", embedded.path, embedded.model_id)
    decoding = DecodingConfig(max_tokens=12)

    def engine(**options: str) -> ChatEngine:
        return ChatEngine(EngineConfig(memory="trace_bank", memory_options=options, activation_log_path=None,
                                       background_updates=False, decoding=decoding), backend=backend)

    eng = engine()
    try:
        bank = eng.module
        for text in ("Hi! The wifi password at the cabin is pinecone77.", "Thanks, that was really helpful!",
                     "What is the capital of France?", "My younger brother is called Kenji."):
            bank.write([{"role": "user", "content": text}], 0)
        assert [bank._text(t) for t in bank.traces] == ["The wifi password at the cabin is pinecone77.",
                                                        "My younger brother is called Kenji."]
        # A leading clause that tells nothing goes; one that does (when) stays.
        assert bank._trimmed("Hi, I'm Ottoline.") == "I'm Ottoline."
        assert bank._trimmed("Well, honestly, my flat number is 62.") == "My flat number is 62."
        assert bank._trimmed("Last week, I sold my old bike.") == "Last week, I sold my old bike."
        assert bank._trimmed(", my flat number is 62.") == "My flat number is 62."  # nothing before the comma
        assert [bank._text(bank.traces[i]) for i in bank.select("What's the cabin's wifi password?")] == [
            "The wifi password at the cabin is pinecone77."]
        # A neighbouring question reads the cabin's statement; with `cover_surprisal` on, "gym" stays
        # surprising after it and nothing is read.
        neighbour = "What is the wifi password at my gym?"
        assert [bank._text(bank.traces[i]) for i in bank.select(neighbour)] == [
            "The wifi password at the cabin is pinecone77."]
        bank.cfg.cover_surprisal = 6.5
        assert bank.select(neighbour) == []
        bank.cfg.cover_surprisal = 0.0
        unrelated = "Can you help me write a short poem about autumn?"
        assert bank.select(unrelated) == []
        plain = eng.respond([{"role": "user", "content": unrelated}], memory=False).tokens
        assert eng.respond([{"role": "user", "content": unrelated}]).tokens == plain
        # Said again, a statement replaces its twin (int4 keys, the default, compared as stored); one that
        # differs in a word is a trace of its own.
        for text, verb in (("My younger brother is called Kenji.", "restated"),
                           ("My younger sister is called Kenji.", "stored")):
            assert bank.write([{"role": "user", "content": text}], 0).note == f"{verb}: {text}"
        assert [bank._text(t) for t in bank.traces] == ["The wifi password at the cabin is pinecone77.",
                                                        "My younger brother is called Kenji.",
                                                        "My younger sister is called Kenji."]
    finally:
        eng.close()
    eng = engine(relevance="-100", check_margin="-2")  # positive control: every candidate checked and read
    try:
        eng.module.write([{"role": "user", "content": "My younger brother is called Kenji."}], 0)
        assert eng.module.select("Can you help me write a short poem about autumn?") == [0]
    finally:
        eng.close()
    backend.close()


def test_a_chat_of_statements_through_the_cli_does_not_echo_its_first_reply(embedded, tmp_path: Path) -> None:
    """Piped into `python -m lmm.chat` as a user would, statements one after another: each reply reads
    nothing the chat still holds (reading the first statement again made every later reply a copy of
    the first). Control: a new process, the chat gone, reads the statement for its question."""
    from lmm.testing import run_chat

    state = tmp_path / "m.safetensors"
    args = ["--model", str(Path(embedded.path).resolve()), "--memory", "trace_bank", "--json", "--mm-path", str(state),
            "--max-tokens", "24"]
    statements = ["Hi, I am Tomasz and I teach maths at a school in Gdansk.", "My wife Ola is a dentist.",
                  "Our son Kuba is nine."]
    first = run_chat(args, "".join(s + "\n" for s in statements).encode(), tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    turns = [json.loads(line) for line in first.stdout.decode().splitlines()]
    assert [t["read"] for t in turns] == [[], [], []]
    assert len({t["assistant"] for t in turns}) == 3
    second = run_chat(args, b"How old is my son?\n", tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    assert "Our son Kuba is nine." in [r["text"] for r in json.loads(second.stdout.decode())["read"]]


@pytest.mark.parametrize("backend_name", ["torch", pytest.param("mlx_lm", marks=pytest.mark.mlx)])
def test_teacher_rows_are_the_one_at_a_time_questions_and_answers(embedded, backend_name: str) -> None:
    """The teacher's batched rows give the questions and answers the frozen model writes one at a time
    (its own `generate`, the seeds and prompts of the rows), and most rows answer inside the batch."""
    from lmm.teacher import Teacher, TeacherConfig, answer_prompt, question_prompt

    backend = load_backend(backend_name, embedded.path, embedded.model_id)
    config = TeacherConfig(questions=4, forward_tries=0, temperature=0.8, max_tokens=32, seed=0)
    teacher = Teacher(backend, config)
    rows = teacher._rows(FACT, range(4))
    for k, row in enumerate(rows):  # `_complete`: one `generate` of the frozen model to the end of the line
        ask = DecodingConfig(strategy="greedy" if k == 0 else "sample", temperature=0.8, max_tokens=32, seed=k,
                             repetition_penalty=1.0)
        assert row.question == teacher._complete(question_prompt(FACT), ask)
        if row.answer is not None:
            greedy = DecodingConfig(strategy="greedy", max_tokens=32, repetition_penalty=1.0)
            assert row.answer == teacher._complete(answer_prompt(FACT, row.question), greedy)
    assert sum(r.answer is not None for r in rows) >= 3
    backend.close()
