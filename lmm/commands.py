"""Slash commands, shared by the interactive REPL and the piped mode.

Owns parsing `/name args` lines and running them against a `ChatSession`; results come
back as `CommandResult` (text to show, whether to exit, whether to save on exit) so the
caller decides how to print. It holds no terminal code and no model code.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmm.session import ChatSession


@dataclass
class CommandResult:
    text: str = ""
    exit: bool = False
    save_on_exit: bool = True


Handler = Callable[[ChatSession, str], CommandResult]
COMMANDS: dict[str, tuple[Handler, str]] = {}


def command(name: str, help_text: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (fn, help_text)
        return fn

    return register


def is_command(line: str) -> bool:
    return line.startswith("/")


def run_command(session: ChatSession, line: str) -> CommandResult:
    name, _, args = line[1:].strip().partition(" ")
    entry = COMMANDS.get(name.lower())
    if entry is None:
        close = difflib.get_close_matches(name.lower(), COMMANDS, n=1)
        hint = f" Did you mean /{close[0]}?" if close else ""
        return CommandResult(f"unknown command /{name}.{hint} Type /help for the list.")
    return entry[0](session, args.strip())


@command("help", "list the commands")
def _help(session: ChatSession, args: str) -> CommandResult:
    return CommandResult("\n".join(f"/{name:<10} {text}" for name, (_, text) in COMMANDS.items()))


@command("exit", "save the memory and leave")
def _exit(session: ChatSession, args: str) -> CommandResult:
    return CommandResult(exit=True)


@command("save", "/save [path]: save the memory now")
def _save(session: ChatSession, args: str) -> CommandResult:
    path = session.save(Path(args) if args else None)
    return CommandResult(f"memory saved to {path}" if path else "")


@command("load", "/load path: replace the memory with a saved one")
def _load(session: ChatSession, args: str) -> CommandResult:
    if not args:
        return CommandResult("usage: /load path")
    session.load(Path(args))
    return CommandResult(f"memory loaded from {args}")


@command("reset", "clear the chat history, keep the memory")
def _reset(session: ChatSession, args: str) -> CommandResult:
    session.engine.reset_chat()
    return CommandResult("chat history cleared; memory kept")
