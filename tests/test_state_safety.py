"""One memory, two chats; poisoned and mangled state files; updates that go non-finite.

Every refusal here is checked through the real entry point where a user would meet it (one
line, exit 2, the file byte for byte as it was), and each "nothing changes" check has a
positive control that shows the same code path does change things when it should.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.engine import ChatEngine, EngineConfig
from lmm.state import StateFileError, read_state, recovery_path
from lmm.testing import chat_env, run_chat, tiny_chat_args

# --- one user in two chats ----------------------------------------------------------------------


def _open_chat(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmm.chat", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=chat_env(tmp_path), cwd=tmp_path)


def test_second_chat_of_a_memory_is_refused_naming_the_first(tiny_models, tmp_path: Path) -> None:
    args = [*tiny_chat_args(tiny_models), "--memory", "lora_on_user", "--user", "alice", "--json"]
    state = tmp_path / "artifacts" / "users" / "alice" / "lora_on_user.safetensors"
    first = _open_chat(args, tmp_path)
    assert first.stdin is not None and first.stdout is not None
    first.stdin.write(b"my locker code is 4711\n")
    first.stdin.flush()
    assert json.loads(first.stdout.readline())["update"]["loss"] is not None
    # order 1: the second chat leaves (refused) while the first is open
    second = run_chat(args, b"my locker code is 1234\n", tmp_path)
    err = second.stderr.decode().strip().splitlines()
    assert second.returncode == 2 and second.stdout == b"" and len(err) == 1
    assert f"in use by another lmm chat (pid {first.pid})" in err[0]
    # the first chat keeps working and saves what it learned
    first.communicate(b"my bike is blue\n", timeout=120)  # writes, closes stdin (EOF: save), waits
    assert first.returncode == 0 and read_state(state)[0].update_count == 2
    # order 2: once the first chat has left, the next one starts from its memory and adds to it
    third = run_chat(args, b"my car is red\n", tmp_path)
    assert third.returncode == 0, third.stderr.decode()
    assert "loaded memory" in third.stderr.decode() and read_state(state)[0].update_count == 3


def test_lock_follows_a_user_switch(tiny_models, tmp_path: Path) -> None:
    """/user bob releases alice: another chat of alice may start while this one goes on as bob."""
    args = [*tiny_chat_args(tiny_models), "--memory", "identity"]
    first = _open_chat([*args, "--user", "alice"], tmp_path)
    assert first.stdin is not None and first.stderr is not None
    first.stdin.write(b"/user bob\n")
    first.stdin.flush()
    deadline = time.monotonic() + 120
    while b"now user bob" not in (line := first.stderr.readline()) and time.monotonic() < deadline:
        assert line, "the chat ended before switching"
    assert run_chat([*args, "--user", "alice"], b"", tmp_path).returncode == 0
    refused = run_chat([*args, "--user", "bob"], b"", tmp_path)
    assert refused.returncode == 2 and f"pid {first.pid}" in refused.stderr.decode()
    first.communicate(b"", timeout=120)
    assert first.returncode == 0


# --- non-finite state -----------------------------------------------------------------------------


def _saved_lora(tiny_models, tmp_path: Path) -> Path:
    state = tmp_path / "mem.safetensors"
    proc = run_chat([*tiny_chat_args(tiny_models), "--memory", "lora_on_user", "--mm-save-path", str(state)],
                    b"the cat sat on the mat\n", tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    return state


def _rewrite(path: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_state_is_refused_before_the_first_turn(tiny_models, tmp_path: Path, value: float) -> None:
    state = _saved_lora(tiny_models, tmp_path)
    # positive control: the untouched file loads
    ok = run_chat([*tiny_chat_args(tiny_models), "--memory", "lora_on_user", "--mm-path", str(state)], b"", tmp_path)
    assert ok.returncode == 0 and "loaded memory" in ok.stderr.decode()

    def poison(tensors: dict) -> None:
        tensors["param.A"] = tensors["param.A"].copy()
        tensors["param.A"][0, 0] = value

    _rewrite(state, poison)
    before = state.read_bytes()
    proc = run_chat([*tiny_chat_args(tiny_models), "--memory", "lora_on_user", "--mm-path", str(state)],
                    b"hello\n", tmp_path)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == b"" and len(err) == 1
    assert "tensor param.A holds NaN or infinite values" in err[0]
    assert state.read_bytes() == before and not recovery_path(state).exists()


@pytest.fixture
def tiny_engine(tiny_models) -> ChatEngine:
    config = EngineConfig(model=str(tiny_models["llama"]), backend="torch", memory="lora_on_user",
                          activation_log_path=None, decoding=DecodingConfig(max_tokens=4), background_updates=True)
    engine = ChatEngine(config)
    yield engine
    engine.close()


def test_nonfinite_update_is_rolled_back(tiny_engine: ChatEngine, tmp_path: Path) -> None:
    engine = tiny_engine
    notices: list[str] = []
    engine.set_notice(notices.append)
    engine.set_autosave(tmp_path / "auto.safetensors")
    first = engine.ask("the cat sat on the mat")  # positive control: a good update is kept and autosaved
    assert first.update.rolled_back is None and engine.module.update_count == 1
    kept = {k: v.copy() for k, v in engine.module.state_tensors().items()}
    assert read_state(tmp_path / "auto.safetensors")[0].update_count == 1
    learn = engine.module.learn

    def poisoned(batch):
        result = learn(batch)
        engine.module.params["B"] = engine.module.params["B"] * float("nan")
        return result

    engine.module.learn = poisoned
    turn = engine.ask("a dog barked at the moon")
    assert turn.update.rolled_back == "param.B" and engine.module.update_count == 1
    assert notices and "rolled back: tensor param.B was not finite" in notices[-1]
    after = engine.module.state_tensors()
    assert all(np.array_equal(after[k], kept[k]) for k in kept)
    assert read_state(tmp_path / "auto.safetensors")[0].update_count == 1  # the autosave kept the good state
    engine.module.learn = learn
    assert engine.ask("a bird sang").update.rolled_back is None and engine.module.update_count == 2


def test_a_save_renames_an_autosave_that_holds_the_same_memory(tiny_engine: ChatEngine, tmp_path: Path) -> None:
    """Saving right after an update's autosave renames the autosave instead of writing the memory again
    (a 10,000-fact memory: 300 ms -> 1 ms); the file holds the same tensors. Positive control: a save
    to a path the autosave does not stand for is written and leaves the autosave in place."""
    engine = tiny_engine
    target = tmp_path / "mem.safetensors"
    auto = recovery_path(target)
    engine.set_autosave(auto)
    engine.ask("the cat sat on the mat")
    engine.wait_for_update()
    inode, state = auto.stat().st_ino, {k: v.copy() for k, v in engine.module.state_tensors().items()}
    other = engine.save_memory(tmp_path / "elsewhere.safetensors")
    assert auto.exists() and other.stat().st_ino != inode
    engine.save_memory(target)
    assert not auto.exists() and target.stat().st_ino == inode
    header, saved = read_state(target)
    assert header.update_count == 1 and sorted(saved) == sorted(state)
    assert all(np.array_equal(saved[k], state[k]) for k in state)
    engine.ask("a dog barked at the moon")  # the next change is autosaved again, and saved by renaming
    engine.wait_for_update()
    inode = auto.stat().st_ino
    engine.save_memory(target)
    assert target.stat().st_ino == inode and read_state(target)[0].update_count == 2


# --- the loader under fuzzing -------------------------------------------------------------------


def _mutations(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    header_len = int.from_bytes(data[:8], "little")
    if kind == 0:  # flipped bytes anywhere
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # truncated
        return data[: rng.randrange(len(data))]
    if kind == 2:  # a huge header length
        return rng.choice([2**63 - 1, 2**40, header_len + 10**6, len(data)]).to_bytes(8, "little") + data[8:]
    if kind == 3:  # a broken JSON header
        out = bytearray(data)
        i = rng.randrange(8, 8 + header_len)
        out[i] = rng.choice(b'{}[]":,x\x00\xff')
        return bytes(out)
    if kind == 4:  # flipped bytes inside the tensor data (may produce NaN/Inf)
        out = bytearray(data)
        start = 8 + header_len
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(start, len(out))] = rng.choice([0xFF, 0x7F, 0x80, 0x00])
        return bytes(out)
    return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))  # trailing junk


def test_loader_fuzz_ends_in_one_line_or_a_clean_load(tiny_engine: ChatEngine, tmp_path: Path) -> None:
    engine = tiny_engine
    good = tmp_path / "good.safetensors"
    engine.ask("the cat sat on the mat")
    engine.save_memory(good)
    data = good.read_bytes()
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    start = time.monotonic()
    for i in range(1000):
        path = tmp_path / f"fuzz{i % 10}.safetensors"
        path.write_bytes(_mutations(data, rng))
        before = path.read_bytes()
        t0 = time.monotonic()
        try:
            engine.load_memory(path)
            outcomes["loaded"] += 1
            assert all(np.isfinite(v).all() for v in engine.module.state_tensors().values())
        except StateFileError as exc:  # anything else (a traceback) fails the test
            assert "\n" not in str(exc) and str(path) in str(exc)
            outcomes["refused"] += 1
        assert time.monotonic() - t0 < 10, f"case {i} took too long"
        assert path.read_bytes() == before
    assert outcomes["refused"] > 500 and sum(outcomes.values()) == 1000, outcomes
    assert time.monotonic() - start < 300
