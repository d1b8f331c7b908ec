"""Nothing lost: SIGKILL at random moments, the autosave and its recovery, Ctrl+C, incognito.

The kill loop runs a small writer process that autosaves the way the engine does
(`save_state` on the recovery path) and kills it at random moments, many of them in the
middle of a save; the real chat is then killed a few times through `python -m lmm.chat`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmm.state import read_state, recovery_path
from lmm.testing import chat_env, run_chat
from lmm.testing import tiny_chat_args as tiny_args

WRITER = r"""
import sys
import numpy as np
from lmm.state import StateHeader, read_state, save_state
path = sys.argv[1]
start = int(sys.argv[2])
for i in range(start + 1, start + 10_000):
    header = StateHeader(module="identity", config="{}", model_id="m", hidden_size=8, layer=0, update_count=i)
    tensors = {"param.w": np.full((192, 256), i, dtype=np.float32), "buffer.n": np.array([i], dtype=np.int64)}
    print(f"saving {i}", flush=True)
    save_state(path, header, tensors)
    print(f"done {i}", flush=True)
"""


def test_sigkill_loop_leaves_the_last_or_previous_update(tmp_path: Path) -> None:
    """60 kills at random moments: the autosave is always readable and holds the last completed
    write or the one being written (never a torn file), and no temporary file piles up."""
    rng = random.Random(0)
    path = recovery_path(tmp_path / "mem.safetensors")
    completed = 0
    during_save = 0
    for _ in range(60):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(completed)],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.15, 0.6))  # past the imports, into the save loop
        child.send_signal(signal.SIGKILL)
        out = child.communicate()[0].splitlines()
        done = [int(line.split()[1]) for line in out if line.startswith("done")]
        last = done[-1] if done else completed
        during_save += bool(out) and out[-1].startswith("saving")
        if not path.exists():
            assert last == completed == 0
            continue
        header, tensors = read_state(path)  # readable: a StateFileError here is a torn file
        assert header.update_count in (last, last + 1)
        assert int(tensors["buffer.n"][0]) == header.update_count == float(tensors["param.w"][0, 0])
        completed = header.update_count  # the next start goes on from what it finds
    assert during_save >= 10, f"only {during_save} kills landed inside a save"
    assert completed > 60
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 60  # at most one per kill, never read as state


LINES = "".join(f"Fact number {i}: my locker code is {1000 + i}.\n" for i in range(400)).encode()


def _current(state: Path) -> int:
    """Update count of the memory the next start would load: the autosave, else the saved file, else 0."""
    for path in (recovery_path(state), state):
        if path.exists():
            return read_state(path)[0].update_count  # a torn file raises here
    return 0


def _kill_chat(args: list[str], tmp_path: Path, delay: float, after_first_reply: bool = False) -> int:
    """Start the chat on a stream of statements, SIGKILL it after `delay` seconds (counted from its first
    reply with `after_first_reply`) in its start-up, a turn, an update or an autosave; return how many
    replies it printed (each after its autosave)."""
    child = subprocess.Popen([sys.executable, "-m", "lmm.chat", *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=chat_env(tmp_path), cwd=tmp_path)
    assert child.stdin is not None
    try:
        child.stdin.write(LINES)
        child.stdin.flush()
    except BrokenPipeError:
        pass
    first = child.stdout.readline() if after_first_reply and child.stdout is not None else b""
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    out = child.communicate()[0]
    return len(first.splitlines()) + len(out.splitlines())


def test_sigkill_loop_on_the_real_chat(tiny_models, tmp_path: Path) -> None:
    """50 SIGKILLs of `python -m lmm.chat` at random moments: the next start always finds a readable
    memory holding the last completed update or the one after it, then recovers it."""
    rng = random.Random(2)
    state = tmp_path / "mem.safetensors"
    args = [*tiny_args(tiny_models), "--memory", "lora_on_user", "--json", "--mm-path", str(state)]
    total = 0
    for cycle in range(50):
        if cycle % 5 == 0:  # in start-up, or the first turns
            printed = _kill_chat(args, tmp_path, rng.uniform(0.5, 4.0))
        else:  # among turns, updates and autosaves
            printed = _kill_chat(args, tmp_path, rng.uniform(0.0, 1.0), after_first_reply=True)
        found = _current(state)
        assert found in (total + printed, total + printed + 1), (cycle, found, total, printed)
        total = found
    assert total > 40  # most kills landed among learned turns, not in start-up
    proc = run_chat(args, b"", tmp_path)  # a clean start: recovers, then saves at EOF
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    if recovery_path(state).exists() or "recovered" in err:
        assert f"recovered an unsaved session from {recovery_path(state)} ({total} updates)" in err
    assert read_state(state)[0].update_count == total and not recovery_path(state).exists()


def test_killed_trace_bank_chat_recovers_its_unsaved_session(tiny_models, tmp_path: Path) -> None:
    rng = random.Random(1)
    state = tmp_path / "mem.safetensors"
    args = [*tiny_args(tiny_models), "--memory", "trace_bank", "--json", "--mm-path", str(state)]
    total = 0
    for cycle in range(3):
        printed = _kill_chat(args, tmp_path, rng.uniform(0.0, 0.5), after_first_reply=True)
        found = _current(state)
        assert found in (total + printed, total + printed + 1), (cycle, found, total, printed)
        total = found
    assert total > 0 and not state.exists()  # never saved: every update lives in the autosave
    proc = run_chat(args, b"", tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert f"recovered an unsaved session from {recovery_path(state)} ({total} updates)" in err
    assert read_state(state)[0].update_count == total and not recovery_path(state).exists()


def test_ctrl_c_discards_and_incognito_writes_nothing(tiny_models, tmp_path: Path) -> None:
    state = tmp_path / "mem.safetensors"
    args = [*tiny_args(tiny_models), "--memory", "lora_on_user", "--json", "--mm-path", str(state)]
    assert run_chat(args, b"the cat sat on the mat\n", tmp_path).returncode == 0
    saved = state.read_bytes()
    # Ctrl+C (SIGINT) after a learned turn: the session's changes are dropped, the file stays. SIGINT is
    # set back to its default in the child: a runner that started us in the background may ignore it.
    child = subprocess.Popen([sys.executable, "-m", "lmm.chat", *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=chat_env(tmp_path), cwd=tmp_path,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(b"a dog barked at the moon\n")
    child.stdin.flush()
    assert json.loads(child.stdout.readline())["update"]["loss"] is not None
    assert recovery_path(state).exists()  # the learned turn is safe from a crash ...
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and b"this session's changes are discarded" in err
    assert state.read_bytes() == saved and not recovery_path(state).exists()  # ... and Ctrl+C drops it
    # incognito: no update, no autosave, no save, no lock taken
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_chat([*args, "--incognito"], b"my locker code is 4711\n", tmp_path)
    assert proc.returncode == 0 and state.read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_broken_autosave_stops_with_one_line(tiny_models, tmp_path: Path) -> None:
    state = tmp_path / "mem.safetensors"
    recovery_path(state).write_bytes(b"\x00" * 40)
    proc = run_chat([*tiny_args(tiny_models), "--memory", "lora_on_user", "--mm-path", str(state)], b"hi\n",
                    tmp_path)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "remove it to start from" in err[0]
    assert recovery_path(state).read_bytes() == b"\x00" * 40 and not state.exists()


def test_pid_file_names_the_holder(tmp_path: Path) -> None:
    from lmm.lock import MemoryInUseError, MemoryLock

    first, second = MemoryLock(tmp_path / "m.safetensors"), MemoryLock(tmp_path / "m.safetensors")
    first.acquire()
    with pytest.raises(MemoryInUseError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()  # released: the next chat gets it
    second.release()
