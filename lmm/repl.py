"""The interactive chat: prompt-toolkit input, rich output, slash commands, key rules.

Owns the terminal side of a chat session: line editing with a persistent history file
(`~/.lmm_history`, or env LMM_HISTORY_FILE; nothing is written while incognito),
multi-line input (Alt+Enter, or a block opened and closed by `\"\"\"`), Tab completion of
commands and their obvious arguments, streaming the reply as plain text, a dim stats line
per turn, styling `lmm.commands` results, and the key rules: Ctrl+C while a reply streams
stops that reply; Ctrl+C at an empty prompt leaves without saving (and says so); Ctrl+D,
`/exit`, `exit` and `quit` save and leave. Commands and the memory live elsewhere.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession
from prompt_toolkit import prompt as ask
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.styles import Style
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmm.commands import COMMANDS, CommandResult, TokenLoss, complete, is_command, run_command
from lmm.learning import UpdateSummary
from lmm.repl_text import WordWrap, block_open, clean, clip, unwrap_block
from lmm.session import ChatSession, SessionOpening

if TYPE_CHECKING:
    from lmm.engine import ChatEngine

EXIT_WORDS = {"exit", "quit"}
UPDATE_WAIT = 1.0  # seconds the stats line waits for the background update before moving on
HISTORY_ENV = "LMM_HISTORY_FILE"

_PROMPT_STYLE = Style.from_dict({"user": "bold ansicyan", "incognito": "bold ansimagenta", "arrow": "ansicyan"})


def history_path() -> Path:
    return Path(os.environ.get(HISTORY_ENV) or Path.home() / ".lmm_history").expanduser()


class SessionHistory(FileHistory):
    """History file (0600) that records nothing while the session is incognito."""

    def __init__(self, filename: Path, incognito: Callable[[], bool]) -> None:
        super().__init__(str(filename))
        self.incognito = incognito
        self.failed = False
        self.problem = ""  # a write failure, for the REPL to show once the prompt is done

    def load_history_strings(self) -> Iterable[str]:
        try:
            return list(super().load_history_strings())
        except OSError:
            return []  # checked before the prompt starts; a file that vanished meanwhile is just empty

    def store_string(self, string: str) -> None:
        if self.incognito() or self.failed:
            return
        try:
            fd = os.open(self.filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write(f"\n# {datetime.datetime.now()}\n")
                fh.write("".join(f"+{line}\n" for line in string.split("\n")))
        except OSError as exc:
            self.failed = True
            self.problem = f"history file {self.filename} not writable ({exc.strerror}); history kept in memory only"


class CommandCompleter(Completer):
    """Slash commands, then their first argument: fixed choices, user names or paths."""

    def __init__(self) -> None:
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        line = document.text_before_cursor
        if not line.startswith("/") or "\n" in line:
            return
        head, space, rest = line[1:].partition(" ")
        entry = COMMANDS.get(head.lower())
        if space and entry is not None and entry.arg == "path":
            yield from self.paths.get_completions(Document(rest.lstrip(), len(rest.lstrip())), complete_event)
            return
        for c in complete(line):
            yield Completion(c.text, start_position=c.start, display_meta=c.meta)


class _StopOnCtrlC:
    """While a reply streams: first Ctrl+C asks the generator to stop, a second one raises."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnCtrlC:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def ce_style(ce: float) -> str:
    """Colour for a token's CE (nats): calm green for expected, red for surprising."""
    if ce < 2:
        return "green"
    if ce < 5:
        return "yellow"
    if ce < 8:
        return "dark_orange"
    return "red"


def surprise_text(tokens: list[TokenLoss]) -> Text:
    text = Text()
    for tok, ce, learned in tokens:
        style = ce_style(ce) + (" bold underline" if learned else "")
        text.append(clean(tok), style=style)
    return text


class Repl:
    def __init__(self, session: ChatSession | SessionOpening, *, console: Console | None = None,
                 history: History | None = None) -> None:
        self.opening = session if isinstance(session, SessionOpening) else SessionOpening.opened(session)
        self._session: ChatSession | None = None
        self._loading = not self.opening.done()  # the banner went out before the model was loaded
        self.console = console or Console(highlight=False)
        if history is None:
            history = self._history()
        self.prompt = PromptSession(
            history=history, completer=CommandCompleter(), complete_while_typing=False,
            key_bindings=self._bindings(), multiline=True, prompt_continuation=self._continuation,
            style=_PROMPT_STYLE, enable_suspend=True,
        )
        self.update_unreported = False  # a turn's stats line went out before its update finished

    # --- the session, opened in the background ---------------------------------------------
    @property
    def session(self) -> ChatSession:
        """The chat session; the first use waits for a background opening (and raises its error)."""
        if self._session is None:
            if not self.opening.done():
                self.notice(f"loading {self.opening.label}…")
            session = self.opening.take()
            session.notice = self.notice
            session.engine.set_notice(self.notice)
            self._session = session
            for message in self.opening.notices:
                self.notice(message)
            if self._loading:
                e = session.engine
                self.notice(f"ready · {e.backend.model_id} ({e.backend.name}) · memory {e.module.name} "
                            f"on layer {e.layer}")
        return self._session

    @property
    def engine(self) -> ChatEngine:
        return self.session.engine

    def _who(self) -> tuple[str | None, bool]:
        """User and incognito for the prompt line, before and after the session is taken."""
        source = self._session or self.opening
        return source.user, source.incognito

    def _abort_on_failure(self) -> None:
        """Runs as a prompt starts: a background opening that fails ends the prompt with its error."""
        if self.opening.done():
            if self.opening.error is not None and self._session is None:
                self.prompt.app.exit(exception=self.opening.error)
            return
        app, loop = self.prompt.app, asyncio.get_running_loop()

        def stop() -> None:
            if self.opening.error is not None and app.is_running and app.future and not app.future.done():
                app.exit(exception=self.opening.error)
            elif app.is_running:
                app.invalidate()  # the toolbar's "loading" line goes

        def from_opening_thread() -> None:
            try:
                loop.call_soon_threadsafe(stop)
            except RuntimeError:  # that prompt has ended and its loop is closed: nothing to stop
                return

        self.opening.on_done(from_opening_thread)

    # --- output helpers --------------------------------------------------------------
    def write(self, text: str) -> None:
        """Raw reply text: no markup, no highlighting ([brackets] are the user's, not rich's)."""
        if text:
            self.console.out(text, end="", highlight=False)

    def say(self, message: str, style: str = "") -> None:
        """A line of plain text; the terminal wraps it (paths stay copyable)."""
        self.console.print(Text(clean(message), style=style), soft_wrap=True)

    def notice(self, message: str) -> None:
        self.say(message, "dim")

    def error(self, message: str) -> None:
        self.say(message, "bold red")

    @property
    def colour(self) -> bool:
        return self.console.color_system is not None and not self.console.no_color

    def _history(self) -> History:
        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                with open(path, "rb"):
                    pass
        except OSError as exc:
            self.notice(f"history file {path} unusable ({exc.strerror}); history kept in memory only")
            return InMemoryHistory()
        return SessionHistory(path, lambda: self._who()[1])

    # --- input ----------------------------------------------------------------------------
    def _bindings(self) -> KeyBindings:
        kb = KeyBindings()
        in_block = Condition(lambda: block_open(self.prompt.default_buffer.text))

        @kb.add("c-c", filter=Condition(lambda: bool(self.prompt.default_buffer.text)))
        def _clear(event: KeyPressEvent) -> None:
            event.current_buffer.reset()

        @kb.add("escape", "enter")
        def _newline(event: KeyPressEvent) -> None:
            event.current_buffer.insert_text("\n")

        @kb.add("enter", filter=in_block)
        def _block_newline(event: KeyPressEvent) -> None:
            event.current_buffer.insert_text("\n")

        @kb.add("enter", filter=~in_block)
        def _accept(event: KeyPressEvent) -> None:
            buffer = event.current_buffer
            if buffer.complete_state and buffer.complete_state.current_completion:
                buffer.apply_completion(buffer.complete_state.current_completion)
                return
            buffer.validate_and_handle()

        return kb

    @staticmethod
    def _continuation(width: int, line_number: int, wrap_count: int) -> str:
        return "." * max(0, width - 1) + " "

    def _message(self) -> FormattedText:
        user, incognito = self._who()
        parts = [("class:user", user or "you")]
        if incognito:
            parts.append(("class:incognito", " [incognito]"))
        parts.append(("class:arrow", " >> "))
        return FormattedText(parts)

    def read(self) -> str:
        """One input (maybe several lines). Raises EOFError / KeyboardInterrupt like prompt()."""
        try:
            self.prompt.bottom_toolbar = None if self.opening.done() else self._toolbar
            return self.prompt.prompt(self._message, pre_run=self._abort_on_failure)
        finally:
            history = self.prompt.history
            if isinstance(history, SessionHistory) and history.problem:
                self.notice(history.problem)
                history.problem = ""

    def _toolbar(self) -> str:
        if self.opening.done():
            return f" {self.opening.label} loaded"
        return f" loading {self.opening.label}… (type away: it answers once loaded)"

    # --- the loop -------------------------------------------------------------------------
    def banner(self) -> None:
        user, incognito = self._who()
        who = f"user {user}" if user else "no user"
        mode = ", incognito" if incognito else ""
        if self._loading:
            self.say(f"lmm chat · {self.opening.label} · memory {self.opening.memory} · {who}{mode} · loading in "
                     "the background", "bold")
        else:
            e = self.engine
            self.say(f"lmm chat · {e.backend.model_id} ({e.backend.name}) · memory {e.module.name} on layer "
                     f"{e.layer} · {who}{mode}", "bold")
        self.console.print(Text("/help lists commands · Alt+Enter or \"\"\" for multi-line · Ctrl+C stops a reply · "
                                "Ctrl+D saves and quits · Ctrl+C at an empty prompt quits without saving", style="dim"))

    def run(self) -> int:
        self.banner()
        while True:
            self.report_update(wait=False)
            try:
                raw = self.read()
            except EOFError:
                return self.finish(save=True)
            except KeyboardInterrupt:
                if self.prompt.default_buffer.text.strip():
                    continue  # Ctrl+C on a typed line only clears it (dumb terminals raise here)
                return self.finish(save=False)
            text = unwrap_block(raw)
            if not text:
                continue
            if text.lower() in EXIT_WORDS:
                return self.finish(save=True)
            try:
                self.report_update(wait=True)  # the previous turn's numbers come before what follows
                if is_command(text) and "\n" not in text:
                    result = self.command(text)
                    if result.exit:
                        return self.finish(save=result.save_on_exit)
                    continue
                self.turn(text)
            except KeyboardInterrupt:  # Ctrl+C outside the streaming loop (e.g. a slow save)
                self.say("[interrupted]", "yellow")

    def command(self, line: str) -> CommandResult:
        try:
            result = run_command(self.session, line)
            if result.confirm:
                self.say(result.text.split(" Confirm with:")[0], "yellow")
                answer = ask("Are you sure? [y/N] ")
                if answer.strip().lower() not in {"y", "yes"}:
                    self.notice("cancelled")
                    return CommandResult()
                result = run_command(self.session, result.confirm)
        except (KeyboardInterrupt, EOFError):
            self.notice("cancelled")
            return CommandResult()
        self.show(result)
        return result

    def show(self, result: CommandResult) -> None:
        if result.error:
            self.error(result.text)
        elif result.tokens is not None and self.colour:
            self.console.print(surprise_text(result.tokens))
            legend = Text("CE: ", style="dim")
            for label, ce in (("<2", 0), ("2-5", 3), ("5-8", 6), (">=8", 9)):
                legend.append(label + " ", style=ce_style(ce))
            legend.append("· learned tokens are ", style="dim").append("bold underlined", style="bold underline")
            n = sum(1 for *_, hit in result.tokens if hit)
            legend.append(f" · {n} of {len(result.tokens)} learned", style="dim")
            self.console.print(legend)
        elif result.rows is not None:
            table = Table.grid(padding=(0, 2))
            table.add_column(style="bold cyan", no_wrap=True)
            table.add_column(overflow="fold")
            for key, value in result.rows:
                table.add_row(Text(key), Text(clean(value)))
            self.console.print(table)
        elif result.text:
            self.say(result.text)

    def turn(self, text: str) -> None:
        engine = self.engine
        stopped = False
        wrote = False
        wrap = WordWrap(self.console.width)
        with _StopOnCtrlC() as stop:
            try:
                for piece in engine.stream(text, should_stop=lambda: stop.requested):
                    if piece.text:
                        self.write(wrap.feed(clean(piece.text)))
                        wrote = True
            except KeyboardInterrupt:
                stopped = True
            except Exception as exc:  # a failing model must not end the chat
                self.write(wrap.flush() + ("\n" if wrote else ""))
                self.error(f"error: generation failed: {exc}")
                return
        stopped = stopped or stop.requested
        self.write(wrap.flush() + ("\n" if wrote else ""))
        if stopped:
            self.say("[reply stopped]", "yellow")
        self.notice(self._turn_stats(stopped))

    def _turn_stats(self, stopped: bool) -> str:
        turn = self.engine.last_turn
        parts = [f"{turn.generation_tokens} tokens", f"{turn.tokens_per_second:.1f} tok/s"]
        if turn.read:  # what the memory read, numbered as /memory lists it, so a wrong read can be /forget-ed
            parts.insert(0, "read " + ", ".join(f'#{r.number} "{clip(r.text)}"' for r in turn.read))
        try:
            done = self.engine.update_done(UPDATE_WAIT) if turn.update is None else True
        except KeyboardInterrupt:
            done = False
        if done:
            parts.append(self._update_stats(self.engine.wait_for_update()))
        elif stopped:
            parts.append("the update runs in the background")
            self.update_unreported = True
        else:
            parts.append("learning in the background…")
            self.update_unreported = True
        return " · ".join(parts)

    @staticmethod
    def _update_stats(update: UpdateSummary | None) -> str:
        if update is None:
            return "no update"
        if update.skipped:
            return f"not learned ({update.skipped})"
        if update.learner in ("direct", "consolidate"):
            return f"update {update.seconds:.2f}s · {update.note}"
        learned = sum(1 for *_, hit in update.token_losses if hit)
        loss = f"loss {update.loss:.2f} -> {update.loss_after:.2f}" if update.loss is not None else "loss -"
        return f"update {update.seconds:.2f}s · {loss} · {learned} token{'s' if learned != 1 else ''} learned"

    def report_update(self, wait: bool) -> None:
        """Print the stats of an update that finished after its turn's stats line."""
        if self.update_unreported and (wait or self.engine.update_done(0)):
            self.update_unreported = False
            self.notice(f"(previous turn) {self._update_stats(self.engine.wait_for_update())}")

    def finish(self, save: bool) -> int:
        if self._session is None and not self.opening.done():
            self.notice("left before the model had loaded: nothing was changed")
            return 0 if save else 130
        if not save:
            self.session.discard()
            self.say("Ctrl+C: leaving WITHOUT saving the memory: this session's changes are discarded "
                     "(Ctrl+D or /exit would have saved them)", "yellow")
            return 130
        try:
            path = self.session.save()
        except (OSError, ValueError) as exc:
            self.error(f"error: saving failed: {exc}")
            return 1
        if path is not None:
            self.notice(f"memory saved to {path}")
        return 0


def run_repl(session: ChatSession | SessionOpening) -> int:
    """Run the interactive chat until the user leaves; return the exit code."""
    return Repl(session).run()
