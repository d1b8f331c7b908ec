"""Slash commands (lmm.commands) against a real session on a tiny random model, per-user zero
leakage, odd input (context overflow, non-UTF-8 stdin) and the commands in piped mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.commands import COMMANDS, complete, format_surprise, run_command
from lmm.engine import ChatEngine, EngineConfig
from lmm.session import ChatSession, user_state_path
from lmm.state import read_state

TEACH = ["My name is Alice and I live in Paris.", "My cat is called Pepper and my colour is blue."]
PROBES = ["Hello! What is my name?", "Where do I live?", "Tell me about my cat."]


@pytest.fixture
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture
def backend(tiny_backend):
    """The shared tiny llama on torch (each engine claims its hook when it runs)."""
    return tiny_backend("torch", "llama")


@pytest.fixture(autouse=True)
def artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "artifacts"
    monkeypatch.setenv("LMM_ARTIFACTS", str(root))
    return root


@pytest.fixture
def make_session(backend) -> Iterator[Callable[..., ChatSession]]:
    made: list[ChatSession] = []

    def make(user: str | None = "alice", max_tokens: int = 8, **session_kw) -> ChatSession:
        config = EngineConfig(model="tiny-llama", backend="torch", memory="lora_on_user", activation_log_path=None,
                              background_updates=False, decoding=DecodingConfig(max_tokens=max_tokens))
        engine = ChatEngine(config, backend=backend)
        session = ChatSession(engine, user=user, **session_kw)
        session.start()
        made.append(session)
        return session

    yield make
    for session in made:
        session.close()  # the memory lock, as the CLI releases it at exit


def same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- registry, help, unknown commands --------------------------------------------------------------

def test_help_lists_every_command(make_session) -> None:
    session = make_session()
    text = run_command(session, "/help").text
    for name in ("help", "save", "load", "reset", "forget", "memory", "surprise", "incognito", "user", "set",
                 "stats", "exit"):
        assert name in COMMANDS and f"/{name}" in text
    assert run_command(session, "/help set").text.startswith("/set [KEY VALUE]:")


@pytest.mark.parametrize(("line", "expected"), [
    ("/memroy", "Did you mean /memory?"), ("/SUPRISE", "Did you mean /surprise?"),
    ("/zzzzzz", "unknown command /zzzzzz. Type /help"), ("/", "/help"), ("/help nope", "unknown command /nope"),
])
def test_unknown_commands_get_a_suggestion(make_session, line: str, expected: str) -> None:
    result = run_command(make_session(), line)
    assert result.error and expected in result.text and not result.exit


@pytest.mark.parametrize("line", ["/exit", "/quit", "/QUIT"])
def test_exit_saves_by_default(make_session, line: str) -> None:
    result = run_command(make_session(), line)
    assert result.exit and result.save_on_exit and not result.error


# --- save, load, reset, forget ---------------------------------------------------------------------

def test_save_load_and_bad_files_keep_the_session_alive(make_session, tmp_path: Path) -> None:
    session = make_session()
    engine = session.engine
    engine.ask(TEACH[0])
    taught = engine.module.state_tensors()
    copy = tmp_path / "copy.safetensors"
    assert run_command(session, f"/save {copy}").text == f"memory saved to {copy}" and copy.exists()
    run_command(session, "/forget yes")
    assert not same_state(engine.module.state_tensors(), taught)
    result = run_command(session, f"/load {copy}")
    assert not result.error and "1 update" in result.text
    assert same_state(engine.module.state_tensors(), taught)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a state file")
    for line, words in [(f"/load {tmp_path / 'missing.safetensors'}", "no state file"),
                        (f"/load {garbage}", "not a readable safetensors"), ("/load", "usage: /load path"),
                        (f"/save {tmp_path}", "error:")]:
        result = run_command(session, line)
        assert result.error and words in result.text and "\n" not in result.text, line
    assert same_state(engine.module.state_tensors(), taught)  # failed loads leave the memory alone
    assert engine.ask("still alive?").assistant is not None


def test_reset_clears_history_and_keeps_memory(make_session) -> None:
    session = make_session()
    engine = session.engine
    engine.ask(TEACH[0])
    before = engine.module.state_tensors()
    assert run_command(session, "/reset").text == "chat history cleared; memory kept"
    assert engine.messages == [] and engine.module.update_count == 1
    assert same_state(engine.module.state_tensors(), before)


def test_forget_needs_yes(make_session) -> None:
    session = make_session()
    engine = session.engine
    initial = engine.module.state_tensors()
    engine.ask(TEACH[0])
    asked = run_command(session, "/forget")
    assert asked.confirm == "/forget yes" and "/forget yes" in asked.text and engine.module.update_count == 1
    done = run_command(session, "/forget yes")
    assert "initial state" in done.text and engine.module.update_count == 0
    assert same_state(engine.module.state_tensors(), initial)


# --- /memory, /surprise, /stats ----------------------------------------------------------------------

def test_memory_report(make_session) -> None:
    session = make_session()
    engine = session.engine
    engine.ask(TEACH[0])
    result = run_command(session, "/memory")
    rows = dict(result.rows or [])
    size = sum(t.nbytes for t in engine.module.state_tensors().values())
    assert rows["module"].startswith("lora_on_user on layer 2 of 4")
    assert '"rank": 8' in rows["config"] and rows["updates"] == "1"
    assert rows["state size"] == f"{size:,} bytes in 2 tensors"
    learned = sorted(((ce, tok) for tok, ce, hit in engine.last_update.token_losses if hit), reverse=True)
    assert learned and rows["last learned"].startswith(" ".join(f"{t!r}({ce:.2f})" for ce, t in learned[:10]))
    assert rows["user"] == "alice" and rows["saves to"].endswith("users/alice/lora_on_user.safetensors")
    assert all(key in result.text for key in rows)  # piped mode prints the same report


def test_surprise_structured_and_plain(make_session) -> None:
    session = make_session()
    assert "say something first" in run_command(session, "/surprise").text
    session.engine.ask(TEACH[0])
    result = run_command(session, "/surprise")
    tokens = session.engine.last_update.token_losses
    assert result.tokens == tokens and any(hit for *_, hit in tokens)
    assert result.text.splitlines()[0] == format_surprise(tokens)
    assert "".join(tok for tok, _, _ in tokens) == TEACH[0]  # the content tokens spell the message


def test_format_surprise() -> None:
    tokens = [("My", 1.234, False), (" name", 9.5, True), ("\n", 2.0, False), ("Al", 3.0, False), ("ice", 8.0, True)]
    assert format_surprise(tokens) == "My(1.23) name(9.50)*\\n(2.00)Al(3.00)ice(8.00)*"


def test_stats(make_session) -> None:
    session = make_session()
    assert dict(run_command(session, "/stats").rows or [])["turns"] == "0"
    for text in TEACH:
        session.engine.ask(text)
    rows = dict(run_command(session, "/stats").rows or [])
    assert rows["turns"] == "2" and "mean over" in rows["tokens/s"] and "median over 2" in rows["update time"]
    assert rows["memory updates"].startswith("2 this session")


# --- incognito, users, settings ---------------------------------------------------------------------

def test_incognito_learns_and_saves_nothing(make_session, artifacts: Path) -> None:
    session = make_session()
    engine = session.engine
    assert run_command(session, "/incognito").text == "incognito is off"
    assert "incognito on" in run_command(session, "/incognito on").text and session.incognito
    before = engine.module.state_tensors()
    turn = engine.ask(TEACH[0])
    assert turn.update.skipped == "incognito" and engine.module.update_count == 0
    assert same_state(engine.module.state_tensors(), before)
    assert run_command(session, "/save").error and session.save() is None
    assert "not scored" in run_command(session, "/surprise").text
    assert run_command(session, "/incognito maybe").text == "usage: /incognito [on|off]"
    run_command(session, "/incognito off")
    assert engine.ask(TEACH[0]).update.skipped is None and engine.module.update_count == 1
    # the learned update is autosaved beside the memory file (crash safety); the file itself is not written
    assert not session.save_path.exists() and session.recovery.exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "sp ace"])
def test_user_names_are_validated(make_session, name: str) -> None:
    session = make_session()
    result = run_command(session, f"/user {name}")
    if name == "":
        assert result.text == "user: alice"
    else:
        assert result.error and "invalid user name" in result.text and session.user == "alice"


def test_set_validates_values(make_session) -> None:
    session = make_session()
    engine = session.engine
    for line, words in [("/set temperature -1", "temperature must be >= 0"), ("/set temperature hot", "a number"),
                        ("/set top_p 0", "top_p must be in (0, 1]"), ("/set top_p 1.5", "top_p must be in"),
                        ("/set max_tokens 0", "max_tokens must be >= 1"), ("/set max_tokens 2.5", "an integer"),
                        ("/set max_tokens 512", "below the context window"), ("/set temprature 1", "temperature?"),
                        ("/set temperature", "usage: /set temperature VALUE"),
                        ("/set memory_contrast -1", "memory_contrast must be >= 0")]:
        result = run_command(session, line)
        assert result.error and words in result.text, line
    assert engine.config.decoding == DecodingConfig(max_tokens=8)  # nothing changed
    assert "no effect" in run_command(session, "/set temperature 0.3").text  # greedy by default
    assert not run_command(session, "/set top_p 0.5").error
    assert run_command(session, "/set max_tokens 5").text == "max_tokens = 5"
    assert run_command(session, "/set memory_contrast 0").text == "memory_contrast = 0.0"
    assert (engine.config.decoding.temperature, engine.config.decoding.top_p) == (0.3, 0.5)
    assert engine.ask("hi").generation_tokens <= 5
    assert dict(run_command(session, "/set").rows or [])["max_tokens"] == "5"


def test_set_system_prompt_resets_the_session_cache(make_session) -> None:
    session = make_session()
    engine = session.engine
    engine.ask("hello")
    resets = []
    original = engine.backend.reset_session
    engine.backend.reset_session = lambda: (resets.append(1), original())[1]
    try:
        assert run_command(session, "/set system You are a pirate.").text == "system prompt: 'You are a pirate.'"
    finally:
        engine.backend.reset_session = original
    assert resets and engine.config.system_prompt == "You are a pirate."
    assert engine.chat_messages()[0] == {"role": "system", "content": "You are a pirate."}
    run_command(session, "/set system none")
    assert engine.config.system_prompt is None


def test_completion() -> None:
    names = [c.text for c in complete("/inc")]
    assert names == ["/incognito"]
    assert {c.text for c in complete("/")} == {f"/{n}" for n in COMMANDS}
    assert [c.text for c in complete("/incognito o")] == ["on", "off"]
    assert [(c.text, c.start) for c in complete("/incognito of")] == [("off", -2)]
    assert [c.text for c in complete("/set t")] == ["temperature", "top_p"]
    assert [c.text for c in complete("/user a", users=lambda: ["alice", "bob"])] == ["alice"]
    assert complete("hello") == [] and complete("/set temperature 0") == []


# --- per-user memory: zero leakage -----------------------------------------------------------------

def test_zero_leakage_between_users(make_session) -> None:
    """What alice teaches never reaches bob: state level and behaviour level (greedy replies)."""
    fresh = make_session(user=None).engine  # reference: a fresh memory on the same model
    initial = fresh.module.state_tensors()
    reference = [fresh.ask(p).assistant for p in PROBES]
    fresh_after = fresh.module.state_tensors()

    session = make_session(user="alice")
    engine = session.engine
    assert same_state(engine.module.state_tensors(), initial)
    for text in TEACH * 2:
        engine.ask(text)
    taught = engine.module.state_tensors()
    assert engine.module.update_count == 4 and not same_state(taught, initial)

    # bob starts from the initial state, and bob's file is exactly that state
    assert "now user bob (fresh memory)" in run_command(session, "/user bob").text
    assert engine.messages == [] and engine.module.update_count == 0
    assert "say something first" in run_command(session, "/surprise").text  # alice's message is not shown
    assert dict(run_command(session, "/memory").rows or [])["last learned"] == "nothing yet"
    assert same_state(engine.module.state_tensors(), initial)
    assert "loaded 4 updates" in run_command(session, "/user alice").text
    assert same_state(engine.module.state_tensors(), taught)  # alice's memory comes back
    header, bob_file = read_state(user_state_path("bob", "lora_on_user"))
    assert header.update_count == 0 and same_state(bob_file, initial)

    # bob's greedy replies are those of a fresh engine, turn after turn (bob learns as it goes)
    run_command(session, "/user bob")
    assert [engine.ask(p).assistant for p in PROBES] == reference
    assert same_state(engine.module.state_tensors(), fresh_after)
    run_command(session, "/user alice")
    _, alice_file = read_state(user_state_path("alice", "lora_on_user"))
    assert same_state(alice_file, taught) and same_state(engine.module.state_tensors(), taught)


def test_an_unchanged_memory_is_not_rewritten_on_a_switch(make_session) -> None:
    """Leaving a user whose memory holds what their file holds does not write it again (a large
    memory switches fast); a change since does (the positive control)."""
    session = make_session(user="alice")
    session.engine.ask(TEACH[0])
    run_command(session, "/user bob")
    alice = user_state_path("alice", "lora_on_user")
    stamp = alice.stat().st_mtime_ns, alice.stat().st_ino
    run_command(session, "/user alice")
    run_command(session, "/user bob")  # alice loaded and left unchanged
    assert (alice.stat().st_mtime_ns, alice.stat().st_ino) == stamp
    run_command(session, "/user alice")
    session.engine.ask(TEACH[1])
    run_command(session, "/user bob")
    assert (alice.stat().st_mtime_ns, alice.stat().st_ino) != stamp
    assert read_state(alice)[0].update_count == 2


@pytest.mark.integration
def test_zero_leakage_embedded_model(embedded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real model, with a module that recalls: alice's name comes back to alice after a
    new chat (the positive control: the check can see a recall) and never reaches bob."""
    monkeypatch.setenv("LMM_ARTIFACTS", str(tmp_path))  # users' memory here; the model stays where it is
    config = EngineConfig(model=str(embedded.path), backend="torch", memory="trace_bank", activation_log_path=None,
                          background_updates=False, decoding=DecodingConfig(max_tokens=24))
    session = ChatSession(ChatEngine(config), user="alice")
    session.start()
    try:
        engine = session.engine
        engine.ask("I am Ottoline.")
        engine.reset_chat()
        assert "Ottoline" in engine.ask("What is my name?").assistant  # alice: recalled with no history
        run_command(session, "/user bob")
        engine.reset_chat()
        assert "Ottoline" not in engine.ask("What is my name?").assistant
        run_command(session, "/user alice")  # and alice still has it
        engine.reset_chat()
        assert "Ottoline" in engine.ask("What is my name?").assistant
    finally:
        session.close()
        session.engine.close()


# --- odd input -----------------------------------------------------------------------------------

def test_message_longer_than_the_context_is_cut_from_the_front(make_session) -> None:
    notices: list[str] = []
    session = make_session(max_tokens=16)
    engine = session.engine
    engine.notice = notices.append
    engine.backend.context_length = 64  # a tiny window: budget 64 - 16 = 48 prompt tokens
    try:
        engine.ask("An earlier short exchange.")
        long = " ".join(f"word{i}" for i in range(100)) + " The end is here."
        turn = engine.ask(long)
        fmt = engine.backend.formatter
        assert engine.backend.last_stats.prompt_tokens <= 48
        assert notices and "message longer than the context window: kept its last" in notices[-1]
        kept = engine.messages[-2]["content"]
        assert long.endswith(kept.strip()) and kept.strip().endswith("The end is here.")
        assert len(engine.messages) == 2  # the older exchange was dropped first
        assert len(fmt.generation_ids(engine.chat_messages()[:-1])) <= 48
        assert turn.update is not None and turn.update.skipped is None  # the kept tail is learned from
    finally:
        engine.backend.context_length = 512


def test_piped_commands_and_non_utf8_stdin(tiny_llama: Path, tmp_path: Path) -> None:
    """Piped mode: invalid UTF-8 does not crash; commands work; /forget needs 'yes'; EOF saves."""
    env = dict(os.environ, LMM_ARTIFACTS=str(tmp_path / "art"))
    script = b"\n".join([
        b"hello \xff\xfe caf\xc3 world",  # broken UTF-8 in a chat message
        b"   ",
        b"/surprise",
        b"/memroy",
        b"/load /no/such/file.safetensors",
        b"/set top_p 7",
        b"/forget",
        b"/memory",
        b"/forget yes",
        b"/memory",
        b"second message",
    ]) + b"\n"
    proc = subprocess.run(
        [sys.executable, "-m", "lmm.chat", "--model", str(tiny_llama), "--backend", "torch", "--memory",
         "lora_on_user", "--user", "pipe", "--max-tokens", "8", "--no-activation-log", "--json"],
        input=script, capture_output=True, env=env, timeout=300,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    turns = [line for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    assert len(turns) == 2  # the whitespace-only line was ignored
    assert json.loads(turns[0])["user"] == "hello \ufffd\ufffd caf\ufffd world"  # replaced, not crashed
    assert "*" in err and "(" in err  # /surprise: token(CE) with learned ones starred
    assert "Did you mean /memory?" in err and "no state file at /no/such/file.safetensors" in err
    assert "top_p must be in (0, 1]" in err and "Confirm with: /forget yes" in err
    assert err.index("updates       1") < err.index("memory reset") < err.index("updates       0")
    header, _ = read_state(tmp_path / "art" / "users" / "pipe" / "lora_on_user.safetensors")
    assert header.update_count == 1  # only the message after /forget yes
