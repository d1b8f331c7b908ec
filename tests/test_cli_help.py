"""`python -m lmm.chat --help` reads at 80 columns: every flag in full, metavars a person understands."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lmm.chat import build_parser


def _flags() -> list[str]:
    return sorted({opt for action in build_parser()._actions for opt in action.option_strings})


@pytest.mark.parametrize("columns", ["80", None])
def test_help_shows_every_flag_in_full(columns: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    proc = subprocess.run([sys.executable, "-m", "lmm.chat", "--help"], capture_output=True, text=True, env=env,
                          timeout=60)  # stdout is a pipe
    assert proc.returncode == 0 and proc.stderr == ""
    text = proc.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "<bool>" not in text and "<list" not in text
    listed = {m.group(0) for m in re.finditer(r"(?<![\w-])--?[a-z][\w-]*", text)}
    flags = _flags()
    assert len(flags) > 20 and set(flags) <= listed, set(flags) - listed
    for metavar in ("PATH", "NAME", "N", "KEY=VALUE"):
        assert f" {metavar}" in text


def test_bad_flag_is_one_line_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "lmm.chat", "--max-tokens", "many"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmm: error: argument --max-tokens")
