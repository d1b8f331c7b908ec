"""A user's chat session: whose memory is loaded, where it is saved, and when.

Owns the policy around the engine's memory: per-user state paths
(`artifacts/users/<NAME>/<module>.safetensors`), the load at start (a missing file is
skipped with a notice; a bad one stops the chat before the first turn), one chat per memory
file (a lock held from start to exit), crash safety (the engine autosaves each update beside
the file; the next chat of that file recovers it), saving on exit, leaving without keeping
the session's changes, incognito mode (no updates, nothing written) and switching users
without reloading the model, and opening a session on a background thread (`SessionOpening`) so
that the REPL can take the first message while the model loads. Shared by the REPL and the piped
mode; no terminal I/O.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

from lmm.engine import ChatEngine
from lmm.lock import MemoryLock
from lmm.models import artifacts_dir
from lmm.state import StateFileError, recovery_path

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def plural(n: int, word: str) -> str:
    """"1 update", "2 updates": the count and the word, plural unless one."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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
        self._lock: MemoryLock | None = None
        if user is not None:
            self._set_user_paths(user)
        self.incognito = incognito
        self.engine.learning = not incognito

    def _set_user_paths(self, user: str) -> None:
        self.user = validate_user(user)
        path = user_state_path(user, self.engine.module.name)
        self.load_path = self.save_path = path

    @property
    def recovery(self) -> Path | None:
        """Where this session's unsaved updates are autosaved (None: no save path, nothing to recover)."""
        return recovery_path(self.save_path) if self.save_path is not None else None

    def start(self) -> None:
        """Lock the memory file, then load the memory to start from: an unsaved session left by a
        chat that died, else the saved file; a missing file is not an error."""
        if self.save_path is not None and not self.incognito:
            self._lock = MemoryLock(self.save_path)
            self._lock.acquire()
        recovery = self.recovery
        try:
            if self._recovering():
                self._recover(recovery)
            elif self.load_path is None:
                pass
            elif not self.load_path.exists():
                who = f" for user {self.user}" if self.user else ""
                self.notice(f"no saved memory at {self.load_path}{who}; starting fresh")
            else:
                self.engine.load_memory(self.load_path)
                updates = plural(self.engine.module.update_count, "update")
                self.notice(f"loaded memory from {self.load_path} ({updates})")
        except BaseException:
            self.close()
            raise
        self.engine.set_autosave(None if self.incognito else recovery)

    def _recovering(self) -> bool:
        """Whether `start` loads an unsaved session's autosave (left by a chat that died)."""
        return self.recovery is not None and self.recovery.exists() and not self.incognito

    def _recover(self, recovery: Path) -> None:
        try:
            self.engine.load_memory(recovery)
        except StateFileError as exc:
            raise StateFileError(f"{exc} (an unsaved session's autosave: remove it to start from "
                                 f"{self.save_path})") from None
        updates = plural(self.engine.module.update_count, "update")
        self.notice(f"recovered an unsaved session from {recovery} ({updates}); "
                    f"it is written to {self.save_path} at the next save")

    def set_incognito(self, on: bool) -> None:
        if not on and self.save_path is not None and self._lock is None:
            self._lock = MemoryLock(self.save_path)
            self._lock.acquire()  # a chat started incognito took no lock; writing needs one
        self.incognito = on
        self.engine.learning = not on
        self.engine.set_autosave(None if on else self.recovery)

    def save(self, path: Path | None = None) -> Path | None:
        """Save the memory (explicit path, the session's save path, or a timestamped default)."""
        if self.incognito:
            self.notice("incognito: memory not saved")
            return None
        if path is None and self.save_path is not None and self.engine.saved_as == self.save_path \
                and self.save_path.exists():
            # It already holds this memory: a large one is not rewritten. Read bookkeeping (when a trace
            # was last read, for eviction order) is saved with the next change, as relatime does.
            return self.save_path
        written = self.engine.save_memory(path or self.save_path)
        if path is None and self.save_path is None:
            self.save_path = written  # later saves in this session go to the same file
        if written == self.save_path:
            self._drop_recovery()  # the saved file now holds everything the autosave did
        return written

    def discard(self) -> None:
        """Leave without keeping this session's changes: the saved file stays as it was."""
        self.engine.wait_for_update()
        self.engine.set_autosave(None)
        self._drop_recovery()

    def _drop_recovery(self) -> None:
        recovery = self.recovery
        if recovery is not None:
            recovery.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the memory file for other chats (call after the final save or discard)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def load(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"no state file at {path}")
        self.engine.load_memory(path)

    def switch_user(self, user: str) -> Path | None:
        """Save the current user's memory, then start the new user's (model stays loaded)."""
        validate_user(user)
        saved = self.save()
        self.engine.set_autosave(None)
        self.close()
        self.engine.reset_chat()
        previous = (self.user, self.load_path, self.save_path)
        self._set_user_paths(user)
        if not self._recovering() and not (self.load_path is not None and self.load_path.exists()):
            self.engine.forget()  # nothing to load: start empty (a load replaces the module by itself)
        try:
            self.start()
        except BaseException:
            self.user, self.load_path, self.save_path = previous
            self.start()  # back to the previous user's memory, just saved
            raise
        return saved


class SessionOpenError(Exception):
    """Opening a session in the background failed for a reason the user can fix (one line)."""


class SessionOpening:
    """A `ChatSession` being opened on a background thread (imports, weights, the memory), so that
    the REPL can show its prompt meanwhile. `user` and `incognito` are what the session starts with;
    notices said while opening are kept in `notices` for whoever takes the session."""

    def __init__(self, open_session: Callable[[Callable[[str], None]], ChatSession] | None = None, *,
                 user: str | None = None, incognito: bool = False, label: str = "the model",
                 memory: str = "") -> None:
        self.user, self.incognito, self.label, self.memory = user, incognito, label, memory
        self.notices: list[str] = []
        self.session: ChatSession | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._taken = open_session is None  # opened elsewhere: the taking thread takes the model over
        self._callbacks: list[Callable[[], None]] = []
        self._guard = threading.Lock()
        if open_session is not None:
            # A daemon thread: a user who leaves before the model is loaded does not wait for it.
            threading.Thread(target=self._run, args=(open_session,), name="lmm-open", daemon=True).start()

    @classmethod
    def opened(cls, session: ChatSession) -> SessionOpening:
        """An opening that is already done (the session was opened on this thread)."""
        done = cls(user=session.user, incognito=session.incognito)
        done.session, done._taken = session, True
        done._done.set()
        return done

    def _run(self, open_session: Callable[[Callable[[str], None]], ChatSession]) -> None:
        try:
            session = open_session(self.notices.append)
            session.engine.hand_over()  # this thread ends here; the chat's thread takes the model over
            self.session = session
        except BaseException as exc:  # kept for the thread that takes the session: it raises there
            self.error = exc
        with self._guard:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def done(self) -> bool:
        return self._done.is_set()

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the opening thread) once the opening ends; now if it has ended."""
        with self._guard:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def take(self) -> ChatSession:
        """The session, once opened, for the calling thread to run the chat on; raises what opening it
        raised. Ctrl+C interrupts the wait."""
        while not self._done.wait(0.1):
            pass
        if self.error is not None:
            raise self.error
        assert self.session is not None
        if not self._taken:
            self.session.engine.take_over()
            self._taken = True
        return self.session
