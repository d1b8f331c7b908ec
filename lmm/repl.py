"""Interactive chat loop (placeholder-free minimal version; see issue on the full REPL)."""

from __future__ import annotations

import sys

from lmm.commands import is_command, run_command
from lmm.session import ChatSession

EXIT_WORDS = {"exit", "quit"}


def run_repl(session: ChatSession) -> int:
    """Read, stream the reply, learn. exit/quit/EOF save; Ctrl+C at the prompt does not."""
    engine = session.engine
    while True:
        try:
            line = input(">> ").strip()
        except EOFError:
            return _finish(session, save=True)
        except KeyboardInterrupt:
            return _finish(session, save=False)
        if not line:
            continue
        if line.lower() in EXIT_WORDS:
            return _finish(session, save=True)
        if is_command(line):
            result = run_command(session, line)
            if result.text:
                print(result.text)
            if result.exit:
                return _finish(session, save=result.save_on_exit)
            continue
        try:
            for piece in engine.stream(line):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n[reply interrupted]")
        print()


def _finish(session: ChatSession, save: bool) -> int:
    if not save:
        print("\ninterrupted: memory not saved", file=sys.stderr)
        return 130
    path = session.save()
    if path is not None:
        print(f"memory saved to {path}", file=sys.stderr)
    return 0
