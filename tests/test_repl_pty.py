"""The interactive REPL driven as a person would, through a pseudo-terminal (pexpect).

Models: the tiny random llama (512-token window), and for the full session a copy with its
special-token embeddings zeroed, so that greedy decoding never picks a stop token (a reply runs
to max_tokens: long generations on demand), and a 32k position limit so `/set max_tokens 20000`
is accepted. Words are meaningless; the tests check the chat's behaviour, not the model's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from lmm.repl_text import WordWrap, block_open, clean, clip, unwrap_block
from lmm.testing import tiny_model_dir

pexpect = pytest.importorskip("pexpect")

TIMEOUT = 180  # generous: two shared cores, model load included


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory.getbasetemp() / "repl_tiny_models")


@pytest.fixture(scope="module")
def endless_model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.numpy import load_file, save_file

    dest = tmp_path_factory.mktemp("endless") / "tiny-endless"
    shutil.copytree(tiny_llama, dest)
    config = json.loads((dest / "config.json").read_text())
    config["max_position_embeddings"] = 32768
    (dest / "config.json").write_text(json.dumps(config))
    weights = load_file(str(dest / "model.safetensors"))
    weights["model.embed_tokens.weight"][[0, 1, 2]] = 0.0  # tied head: special tokens score 0, never argmax
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def spawn(model: Path, tmp_path: Path, *args: str, term: str = "xterm-256color", **env_extra: str):
    env = {k: v for k, v in os.environ.items() if k not in {"NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES"}}
    env.update(LMM_ARTIFACTS=str(tmp_path / "art"), LMM_HISTORY_FILE=str(tmp_path / "history"), TERM=term,
               PROMPT_TOOLKIT_NO_CPR="1", **env_extra)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "lmm.chat", "--model", str(model), "--memory", "lora_on_user", "--backend", "torch",
         "--no-activation-log", *args],
        env=env, encoding="utf-8", codec_errors="replace", timeout=TIMEOUT, dimensions=(50, 160),
        logfile=open(tmp_path / "pty.log", "w", encoding="utf-8"),  # noqa: SIM115 (closed with the child)
    )
    return child


def prompt(child, who: str) -> None:
    child.expect_exact(who)
    child.expect_exact(">> ")


def wait(child, *expected: str, who: str = "alice") -> None:
    """Expect these texts in order, then the next prompt."""
    for text in expected:
        child.expect_exact(text)
    prompt(child, who)


def command(child, line: str, *expected: str, who: str = "alice") -> None:
    child.sendline(line)
    wait(child, *expected, who=who)


def test_full_session_on_a_real_terminal(endless_model: Path, tmp_path: Path) -> None:
    """TERM=xterm-256color: the full prompt-toolkit UI, colours and all."""
    child = spawn(endless_model, tmp_path, "--user", "alice", "--max-tokens", "24")
    try:
        # the prompt comes before the model is loaded; the first message waits for it
        child.expect_exact("memory lora_on_user · user alice · loading in the background")
        prompt(child, "alice")

        # a chat turn: streamed reply, then the stats line with the update
        command(child, "My name is Alice and I live in Paris.", "ready · tiny-endless (torch) · memory "
                "lora_on_user on layer 2", "24 tokens", "tok/s", "update", "->", "tokens learned")
        command(child, "/help", "/memory", "/surprise", "/incognito [on|off]", "/exit")

        child.send("/mem\t")  # Tab completes the command name
        time.sleep(0.5)
        child.send("\r")
        wait(child, "state size", "bytes in 2 tensors", "last learned")
        command(child, "/surprise", "CE:", "learned tokens are", "of 11 learned")

        # Alt+Enter inserts a newline: one message of two lines, one reply
        child.send("line one\x1b\rline two\r")
        wait(child, "24 tokens", "tok/s")

        # incognito: no learning, the prompt says so, nothing reaches the history file
        command(child, "/incognito on", "incognito on")
        child.sendline("a private message")
        child.expect_exact("not learned (incognito)")
        prompt(child, "[incognito]")
        command(child, "/incognito off", "incognito off")

        # switch users without reloading; alice's memory comes back
        command(child, "/user bob", "saved alice to", "now user bob (fresh memory)", who="bob")
        command(child, "/user alice", "now user alice (loaded 2 updates)")
        copy = tmp_path / "copy.safetensors"
        command(child, f"/save {copy}", f"memory saved to {copy}")
        assert copy.exists()

        # Ctrl+C during a long generation stops that reply only
        command(child, "/set max_tokens 20000", "max_tokens = 20000")
        child.sendline("please tell me a very long story")
        child.expect_exact("please tell me a very long story")
        child.expect_exact("\x1b[?2004l")  # prompt-toolkit has handed the terminal back: the reply starts
        time.sleep(1.5)  # the reply is streaming (20000 tokens would take minutes)
        child.sendintr()
        child.expect_exact("[reply stopped]")
        prompt(child, "alice")
        command(child, "/set max_tokens 24", "max_tokens = 24")
        command(child, "/stats", "turns", "4", "update time", "memory updates")

        # Ctrl+D saves and leaves
        child.sendeof()
        child.expect_exact("memory saved to")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in (tmp_path / "pty.log").read_text()  # e.g. from the loading thread
    saved = tmp_path / "art" / "users" / "alice" / "lora_on_user.safetensors"
    assert saved.exists() and (tmp_path / "art" / "users" / "bob" / "lora_on_user.safetensors").exists()
    history = (tmp_path / "history").read_text()
    assert "+/help" in history and "+line one\n+line two" in history and "private" not in history
    assert (tmp_path / "history").stat().st_mode & 0o077 == 0


def test_dumb_terminal_odd_input_and_ctrl_c_exit(tiny_llama: Path, tmp_path: Path) -> None:
    """TERM=dumb, NO_COLOR: blocks, odd input, bad commands, /forget asks, Ctrl+C exits unsaved."""
    child = spawn(tiny_llama, tmp_path, "--user", "dora", "--max-tokens", "16", term="dumb", NO_COLOR="1")
    try:
        prompt(child, "dora")
        # a \"\"\" block is one message; [brackets] are printed as they are
        child.sendline('"""')
        child.sendline("first line [bold]not markup[/bold]")
        child.sendline('"""')
        child.expect_exact("tok/s")
        prompt(child, "dora")
        command(child, "/surprise", "(", ")*", "tokens learned (* = CE above the message mean)", who="dora")

        child.sendline("   ")  # whitespace only: ignored
        prompt(child, "dora")
        command(child, "/memroy", "unknown command /memroy. Did you mean /memory?", who="dora")
        command(child, "/load /no/such/state.safetensors", "error: no state file at", who="dora")
        command(child, "/user ../evil", "error: invalid user name", who="dora")
        command(child, "/set temperature hot", "temperature must be a number", who="dora")

        # longer than the 512-token window: cut from the front, with a notice
        child.sendline(" ".join(f"w{i}" for i in range(700)))
        child.expect_exact("message longer than the context window: kept its last")
        child.expect_exact("tok/s")
        prompt(child, "dora")

        child.sendline("/forget")
        child.expect_exact("erases everything")
        child.expect_exact("Are you sure? [y/N]")
        command(child, "n", "cancelled", who="dora")
        child.sendline("/forget")
        child.expect_exact("Are you sure? [y/N]")
        command(child, "y", "memory reset to its initial state", who="dora")
        command(child, "/memory", "updates", "0", who="dora")

        child.send("half a line")  # Ctrl+C on a typed line only clears it
        time.sleep(0.5)
        child.sendintr()
        prompt(child, "dora")
        # A person cannot press a key within milliseconds of the prompt appearing; a SIGINT sent
        # before prompt_toolkit has put the terminal in raw mode lands outside its key handling.
        time.sleep(0.5)
        child.sendintr()  # Ctrl+C at the empty prompt: leave without saving, and say so
        child.expect_exact("WITHOUT saving")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 130
    # nothing of the session is kept: no memory file and no autosave (only the released lock file)
    left = sorted(p.name for p in (tmp_path / "art" / "users" / "dora").iterdir())
    assert left == ["lora_on_user.safetensors.lock"], left


def test_the_stats_line_says_what_the_memory_read(tiny_llama: Path, tmp_path: Path) -> None:
    """trace_bank (tiny-model settings: every sentence stored, routing on the first stage alone): a
    reply that reads a statement names it by its /memory number; one that reads nothing does not.
    The statement is said again after /reset: while the chat holds it, a statement is not re-read."""
    fact = "My name is Alice and I live in Paris."
    opts = [a for kv in ("write_gate=all", "relevance=0", "margin_weight=1000", "threshold=0.99",
                         "sentence_threshold=0.99", "dtype=float32") for a in ("--mm-opt", kv)]
    child = spawn(tiny_llama, tmp_path, "--memory", "trace_bank", *opts, "--user", "alice", "--max-tokens", "4")
    try:
        prompt(child, "alice")
        child.sendline(fact)
        child.expect_exact("stored: " + fact)
        prompt(child, "alice")
        command(child, "/memory list", "1 item", fact)
        command(child, "/reset", "chat history cleared; memory kept")
        child.sendline(fact)
        child.expect_exact(f'read #1 "{fact}" · ')
        child.expect_exact("tok/s")
        prompt(child, "alice")
        child.sendline("Hello! How are you today?")
        child.expect(r"\n([^\r\n]*) tokens · [^\r\n]*tok/s")
        assert "read #" not in child.match.group(1)
        prompt(child, "alice")
    finally:
        child.close()


@pytest.mark.parametrize("term", ["xterm-256color", "dumb"])
def test_a_memory_that_fails_to_load_ends_the_prompt(tiny_llama: Path, tmp_path: Path, term: str) -> None:
    """The model loads behind the prompt; a bad memory file ends it with one line, exit 2, file kept.
    A full terminal's prompt ends by itself; a dumb terminal's prompt (prompt-toolkit's plain input)
    at the first Enter."""
    bad = tmp_path / "art" / "users" / "erin" / "lora_on_user.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a safetensors file")
    child = spawn(tiny_llama, tmp_path, "--user", "erin", term=term)
    try:
        prompt(child, "erin")
        if term == "dumb":
            child.sendline("hello")
        child.expect_exact("lmm: error:")
        child.expect_exact(str(bad))
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 2
    assert bad.read_bytes() == b"not a safetensors file"


# --- input helpers (no terminal needed) -------------------------------------------------------------

@pytest.mark.parametrize(("text", "is_open"), [
    ('"""', True), ('"""\nhello', True), ('"""\nhello\n"""', False), ('"""hi"""', False), ("hello", False),
    ('  """\n', True), ('""""""', False),
])
def test_block_open(text: str, is_open: bool) -> None:
    assert block_open(text) is is_open


def test_unwrap_block_and_clean() -> None:
    assert unwrap_block('"""\nline 1\nline 2\n"""') == "line 1\nline 2"
    assert unwrap_block('"""hi"""') == "hi" and unwrap_block('  plain  ') == "plain" and unwrap_block('""""""') == ""
    assert clean("a\x1b[31mb\tc\nd\x07\x9b") == "a\u241b[31mb\tc\nd\u2407\ufffd"


def test_clip_marks_a_cut() -> None:
    assert clip("short") == "short" and clip("x" * 48) == "x" * 48
    assert clip("word " * 20) == ("word " * 20)[:47].rstrip() + "…" and len(clip("y" * 60)) == 48


def test_word_wrap_streams_whole_words() -> None:
    wrap = WordWrap(20)
    text = "The waves of the ocean, a tapestry woven with threads of life and averyveryverylongwordindeed ok\nend"
    out = "".join(wrap.feed(text[i:i + 3]) for i in range(0, len(text), 3)) + wrap.flush()
    assert out.replace("\n", " ").split() == text.replace("\n", " ").split()  # nothing lost or added
    lines = out.split("\n")
    assert lines[:4] == ["The waves of the ", "ocean, a tapestry ", "woven with threads ", "of life and "]
    assert lines[4] == "averyveryverylongwordindeed ok" and lines[5] == "end"  # too long: left to the terminal
    assert WordWrap(20).feed("no space yet") == "no space "  # a word is held until it is complete
