"""A user's chat session: whose memory is loaded, where it is saved, and when.

Owns the policy around the engine's memory: per-user state paths
(`artifacts/users/<NAME>/<module>.safetensors`), the load at start (a missing file is
skipped with a notice; a bad one stops the chat before the first turn), saving on exit,
incognito mode (no updates, nothing saved) and switching users without reloading the
model. Shared by the REPL and the piped mode; it does no terminal I/O itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from lmm.engine import ChatEngine
from lmm.models import artifacts_dir

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_user(name: str) -> str:
    """Return the name if it is safe as a folder name, else raise ValueError saying why."""
    if not name or "/" in name or "\\" in name or ".." in name or not _USER_RE.match(name):
        raise ValueError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no path separators or '..'"
        )
    return name


def user_state_path(user: str, module: str) -> Path:
    return artifacts_dir() / "users" / validate_user(user) / f"{module}.safetensors"


class ChatSession:
    def __init__(self, engine: ChatEngine, *, user: str | None = None, load_path: Path | None = None,
                 save_path: Path | None = None, incognito: bool = False,
                 notice: Callable[[str], None] = lambda msg: None) -> None:
        self.engine = engine
        self.notice = notice
        self.user: str | None = None
        self.load_path = load_path
        self.save_path = save_path
        if user is not None:
            self._set_user_paths(user)
        self.incognito = False
        self.set_incognito(incognito)

    def _set_user_paths(self, user: str) -> None:
        self.user = validate_user(user)
        path = user_state_path(user, self.engine.module.name)
        self.load_path = self.save_path = path

    def start(self) -> None:
        """Load the memory to start from; a missing file is not an error."""
        if self.load_path is None:
            return
        if not self.load_path.exists():
            who = f" for user {self.user}" if self.user else ""
            self.notice(f"no saved memory at {self.load_path}{who}; starting fresh")
            return
        self.engine.load_memory(self.load_path)
        self.notice(f"loaded memory from {self.load_path} ({self.engine.module.update_count} updates)")

    def set_incognito(self, on: bool) -> None:
        self.incognito = on
        self.engine.learning = not on

    def save(self, path: Path | None = None) -> Path | None:
        """Save the memory (explicit path, the session's save path, or a timestamped default)."""
        if self.incognito:
            self.notice("incognito: memory not saved")
            return None
        written = self.engine.save_memory(path or self.save_path)
        if path is None and self.save_path is None:
            self.save_path = written  # later saves in this session go to the same file
        return written

    def load(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"no state file at {path}")
        self.engine.load_memory(path)

    def switch_user(self, user: str) -> Path | None:
        """Save the current user's memory, then start the new user's (model stays loaded)."""
        validate_user(user)
        saved = self.save()
        self.engine.reset_chat()
        self.engine.forget()
        self._set_user_paths(user)
        self.start()
        return saved
