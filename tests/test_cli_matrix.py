"""Every registered module on both backends through the real entry point, as a user runs it.

`python -m lmm.chat` on a tiny model with background updates on (the CLI's default): one
learned turn and a save in one process, then a reload, a turn and a save in a new one. This
is the path a green in-process suite once missed (the mlx update-thread crash).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmm.memory import get_memory_spec, memory_names
from lmm.memory.base import GradientMemory
from lmm.state import read_state
from lmm.testing import run_chat, tiny_chat_args


@pytest.mark.parametrize("module", memory_names())
def test_module_turn_save_reload(tiny_models, tmp_path: Path, backend_name: str, module: str) -> None:
    state = tmp_path / f"{module}.safetensors"
    args = [*tiny_chat_args(tiny_models, backend_name), "--memory", module, "--json", "--mm-path", str(state)]
    first = run_chat(args, b"My favourite tree is the larch.\n", tmp_path)
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    turn = json.loads(first.stdout.decode().splitlines()[-1])
    assert turn["update"] is not None and turn["update"]["rolled_back"] is None
    header, _ = read_state(state)
    assert header.module == module and header.backend == backend_name

    second = run_chat(args, b"What is my favourite tree?\n", tmp_path)
    err = second.stderr.decode()
    assert second.returncode == 0, err[-2000:]
    assert f"loaded memory from {state}" in err and "Traceback" not in err
    answer = json.loads(second.stdout.decode().splitlines()[-1])
    assert answer["update"] is not None
    # what the memory read: statements for trace_bank (if it routed), never anything for weight modules
    assert isinstance(answer["read"], list) and (module == "trace_bank" or answer["read"] == [])
    assert read_state(state)[0].update_count >= header.update_count


@pytest.mark.parametrize("module", [m for m in memory_names()
                                    if issubclass(get_memory_spec(m).module_cls, GradientMemory)])
def test_consolidate_turn_and_save(tiny_models, tmp_path: Path, backend_name: str, module: str) -> None:
    """`--consolidate` with background updates: the update after the reply is a consolidation, and the
    memory is saved at exit after it."""
    state = tmp_path / f"{module}.safetensors"
    args = [*tiny_chat_args(tiny_models, backend_name), "--memory", module, "--json", "--mm-path", str(state),
            "--consolidate"]
    run = run_chat(args, b"My favourite tree is the larch.\n", tmp_path)
    err = run.stderr.decode()
    assert run.returncode == 0 and "Traceback" not in err, err[-2000:]
    update = json.loads(run.stdout.decode().splitlines()[-1])["update"]
    assert update["learner"] == "consolidate" and update["note"]
    assert read_state(state)[0].module == module
