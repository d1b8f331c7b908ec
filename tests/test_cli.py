"""`python -m lmm.chat` with piped input: the real entry point, in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmm.state import read_state
from lmm.testing import run_chat
from lmm.testing import tiny_chat_args as base_args


@pytest.mark.parametrize("backend", ["torch", "mlx_lm"])
def test_json_turns_and_save_on_eof(tiny_models, tmp_path: Path, backend: str) -> None:
    state = tmp_path / "mem.safetensors"
    proc = run_chat([*base_args(tiny_models, backend), "--memory", "lora_on_user", "--json",
                     "--mm-save-path", str(state)], b"the cat sat on the mat\n\n   \nwhat did the cat see\n", tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    turns = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [t["user"] for t in turns] == ["the cat sat on the mat", "what did the cat see"]  # blank lines ignored
    for t in turns:
        assert {"assistant", "generation_tokens", "tokens_per_second", "update"} <= set(t)
        assert t["update"]["n_selected"] >= 1 and t["update"]["loss"] is not None
    header, _ = read_state(state)
    assert header.update_count == 2 and header.backend == backend
    log = tmp_path / "logs" / "memory_activations.jsonl"
    kinds = {json.loads(line)["kind"] for line in log.read_text().splitlines()}
    assert kinds == {"activation", "update"}


def test_plain_replies_exit_word_and_legacy_path(tiny_models, tmp_path: Path) -> None:
    state = tmp_path / "legacy.safetensors"
    proc = run_chat([*base_args(tiny_models), "--memory", "lora_on_user", "--mm-path", str(state)],
                    b"hello there\nexit\nthis line is never read\n", tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.decode().splitlines()) <= 1  # one reply (it may be empty on a random model)
    err = proc.stderr.decode()
    assert "no saved memory" in err and "memory saved to" in err
    assert read_state(state)[0].update_count == 1
    # the next run loads what the first saved
    proc = run_chat([*base_args(tiny_models), "--memory", "lora_on_user", "--mm-path", str(state)], b"", tmp_path)
    assert proc.returncode == 0 and f"loaded memory from {state} (1 update)" in proc.stderr.decode()


def test_default_save_path_is_timestamped(tiny_models, tmp_path: Path) -> None:
    proc = run_chat([*base_args(tiny_models), "--memory", "identity"], b"hi\n", tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    saved = list((tmp_path / "artifacts").glob("identity_*.safetensors"))
    assert len(saved) == 1 and len(saved[0].stem.split("_")) == 4  # identity_YYYYMMDD_HHMMSS_micro


def test_mismatched_state_stops_before_first_turn(tiny_models, tmp_path: Path) -> None:
    state = tmp_path / "id.safetensors"
    assert run_chat([*base_args(tiny_models), "--memory", "identity", "--mm-save-path", str(state)],
                    b"", tmp_path).returncode == 0
    before = state.read_bytes()
    proc = run_chat([*base_args(tiny_models), "--memory", "lora_on_user", "--mm-path", str(state)],
                    b"hello\n", tmp_path)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == b""
    assert err[-1].startswith("lmm: error:") and "identity" in err[-1] and "lora_on_user" in err[-1]
    assert "Traceback" not in proc.stderr.decode()
    assert state.read_bytes() == before


def test_bad_options_fail_with_one_line(tiny_models, tmp_path: Path) -> None:
    proc = run_chat([*base_args(tiny_models), "--memory", "lora_on_user", "--mm-opt", "rank=0"], b"", tmp_path)
    assert proc.returncode == 2 and "rank must be >= 1" in proc.stderr.decode()
    proc = run_chat([*base_args(tiny_models), "--memory", "nope"], b"", tmp_path)
    assert proc.returncode == 2 and "unknown memory module 'nope'" in proc.stderr.decode()
    proc = run_chat(["--model", str(tmp_path / "missing"), "--local-files-only"], b"", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.decode()


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors"])
def test_a_broken_model_folder_fails_with_one_line(broken: str, tiny_models, tmp_path: Path) -> None:
    """A folder with an unreadable config or no weights: one line naming the file, exit 2, no traceback."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    if broken == "config.json":
        (folder / broken).write_text("{not json")
    else:
        (folder / broken).unlink()
    proc = run_chat(["--model", str(folder), "--max-tokens", "2"], b"hello\n", tmp_path)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr.decode()
    assert err[-1].startswith("lmm: error:") and broken in err[-1]
