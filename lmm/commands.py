"""Slash commands, shared by the interactive REPL and the piped mode.

Owns parsing `/name args` lines, the command registry (usage, help, argument choices for
completion) and running commands against a `ChatSession`. Results come back as
`CommandResult`: plain text (what piped mode prints) plus optional structure the REPL
styles (`rows` for key/value reports, `tokens` for /surprise, `confirm` for commands that
need a yes). It holds no terminal code and no model code; errors become one-line results.
"""

from __future__ import annotations

import difflib
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmm.models import artifacts_dir
from lmm.session import ChatSession, plural, validate_user

TokenLoss = tuple[str, float, bool]  # (token text, CE in nats, learned)


@dataclass
class CommandResult:
    text: str = ""  # complete plain-text result; piped mode prints exactly this
    exit: bool = False
    save_on_exit: bool = True
    error: bool = False
    confirm: str | None = None  # ask the user, then run this command line (the REPL does; piped mode cannot)
    rows: list[tuple[str, str]] | None = None  # key/value report behind `text`
    tokens: list[TokenLoss] | None = None  # /surprise: the scored message behind `text`


Handler = Callable[[ChatSession, str], CommandResult]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    usage: str
    help: str
    choices: tuple[str, ...] = ()  # completions for the first argument
    arg: str = ""  # "path" or "user": completed from the file system / known users


COMMANDS: dict[str, Command] = {}
ALIASES = {"quit": "exit"}  # what people type out of habit (the REPL also takes bare `exit` and `quit`)
SET_KEYS = ("temperature", "top_p", "max_tokens", "memory_contrast", "system")
LEARNED_SHOWN = 10  # /memory lists the most surprising learned tokens of the last message


def command(name: str, usage: str, help_text: str, *, choices: tuple[str, ...] = (),
            arg: str = "") -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = Command(name, fn, usage, help_text, choices, arg)
        return fn

    return register


def is_command(line: str) -> bool:
    return line.startswith("/")


def split_command(line: str) -> tuple[str, str]:
    """`/name  some args` -> ("name", "some args")."""
    name, _, args = line.strip()[1:].strip().partition(" ")
    return name.lower(), args.strip()


def run_command(session: ChatSession, line: str) -> CommandResult:
    """Run one slash command. Never raises for a bad command, argument, path or file."""
    name, args = split_command(line)
    entry = COMMANDS.get(ALIASES.get(name, name))
    if entry is None:
        if not name:
            return CommandResult("type /help for the list of commands", error=True)
        close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.5)
        hint = f" Did you mean /{close[0]}?" if close else ""
        return CommandResult(f"unknown command /{name}.{hint} Type /help for the list.", error=True)
    try:
        return entry.handler(session, args)
    except (OSError, ValueError, KeyError) as exc:  # StateFileError is a ValueError
        return CommandResult(f"error: {_one_line(exc)}", error=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return text[0] if text else type(exc).__name__


def _usage(name: str) -> CommandResult:
    return CommandResult(f"usage: {COMMANDS[name].usage}", error=True)


def _report(rows: list[tuple[str, str]]) -> CommandResult:
    width = max(len(k) for k, _ in rows)
    return CommandResult("\n".join(f"{k:<{width}}  {v}" for k, v in rows), rows=rows)


def known_users() -> list[str]:
    """Users that have a folder under artifacts/users (for completion)."""
    root = artifacts_dir() / "users"
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir())
    except OSError:
        return []


def _path(args: str) -> Path:
    return Path(args).expanduser()


# --- the commands ---------------------------------------------------------------------------

@command("help", "/help [command]", "list the commands, or show one")
def _help(session: ChatSession, args: str) -> CommandResult:
    if args:
        entry = COMMANDS.get(args.lstrip("/").lower())
        if entry is None:
            return run_command(session, "/" + args.lstrip("/"))  # unknown: same suggestion as running it
        return CommandResult(f"{entry.usage}: {entry.help}")
    width = max(len(c.usage) for c in COMMANDS.values())
    lines = [f"{c.usage:<{width}}  {c.help}" for c in COMMANDS.values()]
    return CommandResult("\n".join(lines), rows=[(c.usage, c.help) for c in COMMANDS.values()])


@command("save", "/save [path]", "save the memory now (to the user's file, or to path)", arg="path")
def _save(session: ChatSession, args: str) -> CommandResult:
    if session.incognito:
        return CommandResult("incognito is on: nothing is saved (/incognito off to save again)", error=True)
    path = session.save(_path(args) if args else None)
    return CommandResult(f"memory saved to {path}")


@command("load", "/load path", "replace the memory with a saved state file", arg="path")
def _load(session: ChatSession, args: str) -> CommandResult:
    if not args:
        return _usage("load")
    session.load(_path(args))
    return CommandResult(f"memory loaded from {args} ({plural(session.engine.module.update_count, 'update')})")


@command("reset", "/reset", "clear the chat history; the memory keeps what it learned")
def _reset(session: ChatSession, args: str) -> CommandResult:
    session.engine.reset_chat()
    return CommandResult("chat history cleared; memory kept")


@command("forget", "/forget [N|yes]", "delete item N of /memory list, or reset the whole memory (asks first)",
         choices=("yes",))
def _forget(session: ChatSession, args: str) -> CommandResult:
    if args.isdigit():
        text = session.engine.forget_item(int(args))
        return CommandResult(f"forgot item {args}: {text}")
    if args.lower() != "yes":
        who = f" of user {session.user}" if session.user else ""
        count = plural(session.engine.module.update_count, "update")
        return CommandResult(
            f"/forget erases everything the memory{who} learned ({count}). "
            "Confirm with: /forget yes",
            confirm="/forget yes",
        )
    session.engine.forget()
    tail = " (the saved file changes when you save or exit)" if session.save_path and not session.incognito else ""
    return CommandResult(f"memory reset to its initial state{tail}")


@command("memory", "/memory [list|export FILE]",
         "the memory: a summary; `list` numbers what it holds; `export FILE` writes it as JSON",
         choices=("list", "export"))
def _memory(session: ChatSession, args: str) -> CommandResult:
    action, _, rest = args.partition(" ")
    if action == "list":
        return _memory_list(session)
    if action == "export":
        if not rest.strip():
            return _usage("memory")
        path = session.engine.export_memory(_path(rest.strip()))
        return CommandResult(f"memory exported to {path} ({plural(len(session.engine.memory_items()), 'item')})")
    if action:
        return _usage("memory")
    engine = session.engine
    update = engine.wait_for_update()
    module = engine.module
    tensors = module.state_tensors()
    size = sum(int(t.nbytes) for t in tensors.values())
    rows = [
        ("module", f"{module.name} on layer {engine.layer} of {engine.backend.num_layers} ({engine.backend.name})"),
        ("config", module.config.to_json()),
        ("updates", str(module.update_count)),
        ("state size", f"{size:,} bytes in {len(tensors)} tensor{'s' if len(tensors) != 1 else ''}"),
    ]
    summary = module.summary()
    if summary:
        rows.append(("summary", ", ".join(f"{k}={_num(v)}" for k, v in summary.items())))
    items = module.items()
    rows.append(("items", f"{len(items)} (/memory list shows them, /forget N deletes one)" if items
                 else "none listed (this module's memory is in its weights)" if module.kind != "direct" else "0"))
    rows.append(("user", session.user or "(none)"))
    rows.append(("saves to", "nothing (incognito)" if session.incognito else str(session.save_path or
                                                                                 "a new timestamped file")))
    if update is None:
        learned = "nothing yet"
    elif update.skipped:
        learned = f"last update skipped: {update.skipped}"
    elif update.learner in ("direct", "consolidate"):
        learned = update.note or "nothing"
    else:
        hits = sorted(((ce, tok) for tok, ce, hit in update.token_losses if hit), reverse=True)
        learned = " ".join(f"{tok!r}({ce:.2f})" for ce, tok in hits[:LEARNED_SHOWN]) or "none"
        if len(hits) > LEARNED_SHOWN:
            learned += f" … and {len(hits) - LEARNED_SHOWN} more"
    rows.append(("last learned", learned))
    return _report(rows)


def _memory_list(session: ChatSession) -> CommandResult:
    items = session.engine.memory_items()
    if not items:
        return CommandResult(f"{session.engine.module.name} holds no separate items")
    from datetime import datetime

    lines = []
    for i, item in enumerate(items, start=1):
        when = datetime.fromtimestamp(item.said_at).strftime("%Y-%m-%d %H:%M") if item.said_at else "(date unknown)"
        replaced = f"  (replaced by {item.replaced_by})" if item.replaced_by else ""
        lines.append(f"{i:>4}  {when}  {item.text}{replaced}")
    return CommandResult(f"{plural(len(items), 'item')}, oldest first:\n" + "\n".join(lines))


def _num(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_surprise(tokens: list[TokenLoss]) -> str:
    """Plain form of /surprise: `token(CE)`, learned tokens starred, text spacing kept."""
    out = []
    for tok, ce, learned in tokens:
        shown = tok.replace("\n", "\\n")
        lead = len(shown) - len(shown.lstrip(" "))
        out.append(f"{shown[:lead]}{shown[lead:]}({ce:.2f}){'*' if learned else ''}")
    return "".join(out)


@command("surprise", "/surprise", "the last message's tokens with their CE; * = learned")
def _surprise(session: ChatSession, args: str) -> CommandResult:
    update = session.engine.wait_for_update()
    if update is None:
        return CommandResult("no message scored yet: say something first")
    if update.learner == "consolidate":
        return CommandResult(f"consolidation scores no message tokens; the last message: {update.note}")
    if update.learner == "direct":
        return CommandResult(f"{session.engine.module.name} writes messages into memory directly and scores no "
                             f"tokens; the last message: {update.note}")
    if not update.token_losses:
        reason = update.skipped or "no scored tokens"
        return CommandResult(f"the last message was not scored ({reason})")
    tokens = list(update.token_losses)
    n = sum(1 for _, _, hit in tokens if hit)
    text = f"{format_surprise(tokens)}\n{n} of {len(tokens)} tokens learned (* = CE above the message mean)"
    return CommandResult(text, tokens=tokens)


@command("incognito", "/incognito [on|off]", "on: no learning and nothing saved", choices=("on", "off"))
def _incognito(session: ChatSession, args: str) -> CommandResult:
    value = args.lower()
    if value in {"", "status"}:
        return CommandResult(f"incognito is {'on' if session.incognito else 'off'}")
    if value not in {"on", "off"}:
        return _usage("incognito")
    session.set_incognito(value == "on")
    if session.incognito:
        return CommandResult("incognito on: the memory does not learn and nothing is saved")
    return CommandResult("incognito off: the memory learns again and is saved at exit")


@command("consolidate", "/consolidate [on|off]",
         "on: consolidate this chat's statements into the module's weights, and each new one", choices=("on", "off"))
def _consolidate(session: ChatSession, args: str) -> CommandResult:
    engine, value = session.engine, args.lower()
    if value == "status":
        return CommandResult(f"consolidation is {'on' if engine.consolidating else 'off'}")
    if value not in {"", "on", "off"}:
        return _usage("consolidate")
    if value == "off":
        engine.set_consolidate(False)
        return CommandResult("consolidation off: the module learns from surprising tokens again")
    if session.incognito:
        return CommandResult("incognito is on: nothing is learned, so nothing is consolidated", error=True)
    queued = engine.consolidate_session()
    if not engine.consolidating:
        return CommandResult(f"{engine.module.name} is not a gradient module: it has nothing to consolidate into",
                             error=True)
    return CommandResult(f"consolidation on: {plural(queued, 'earlier message')} consolidating in the background, "
                         "each new statement after its reply")


@command("user", "/user [NAME]", "switch to NAME's memory (saves the current user's first)", arg="user")
def _user(session: ChatSession, args: str) -> CommandResult:
    if not args:
        return CommandResult(f"user: {session.user or '(none)'}")
    name = validate_user(args)
    if name == session.user:
        return CommandResult(f"already user {name}")
    previous = session.user
    saved = session.switch_user(name)
    parts = []
    if saved is not None:
        parts.append(f"saved {previous or 'the memory'} to {saved}")
    count = session.engine.module.update_count
    state = f"loaded {plural(count, 'update')}" if session.load_path and session.load_path.exists() else "fresh memory"
    parts.append(f"now user {name} ({state})")
    return CommandResult("; ".join(parts))


@command("set", "/set [KEY VALUE]", "set temperature, top_p, max_tokens, memory_contrast (0: off) or system "
                                   "(prompt; 'none' clears)",
         choices=SET_KEYS)
def _set(session: ChatSession, args: str) -> CommandResult:
    engine = session.engine
    decoding = engine.config.decoding
    if not args:
        return _report([("temperature", str(decoding.temperature)), ("top_p", str(decoding.top_p)),
                        ("max_tokens", str(decoding.max_tokens)), ("memory_contrast", str(decoding.memory_contrast)),
                        ("system", repr(engine.config.system_prompt) if engine.config.system_prompt else "(none)"),
                        ("decoding", decoding.resolved(engine.backend.supports_beam))])
    key, _, value = args.partition(" ")
    key, value = key.lower(), value.strip()
    if key not in SET_KEYS:
        close = difflib.get_close_matches(key, SET_KEYS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        return CommandResult(f"unknown setting {key!r}.{hint} Settings: {', '.join(SET_KEYS)}", error=True)
    if not value:
        return CommandResult(f"usage: /set {key} VALUE", error=True)
    if key == "system":
        engine.set_system_prompt(None if value.lower() == "none" else value)
        shown = repr(engine.config.system_prompt) if engine.config.system_prompt else "(none)"
        return CommandResult(f"system prompt: {shown}")
    try:
        number: float | int = int(value) if key == "max_tokens" else float(value)
    except ValueError:
        kind = "an integer" if key == "max_tokens" else "a number"
        return CommandResult(f"{key} must be {kind}, got {value!r}", error=True)
    if key == "max_tokens" and number >= engine.backend.context_length:
        return CommandResult(f"max_tokens must be below the context window ({engine.backend.context_length})",
                             error=True)
    if key == "temperature" and number > 10:
        return CommandResult(f"temperature must be in [0, 10], got {number}", error=True)
    engine.set_decoding(**{key: number})  # validates
    note = ""
    if key in {"temperature", "top_p"} and engine.config.decoding.resolved(engine.backend.supports_beam) != "sample":
        note = " (decoding is not sampling, so this has no effect; start with --non-deterministic to sample)"
    return CommandResult(f"{key} = {number}{note}")


@command("stats", "/stats", "turns, speed, update times and memory updates of this session")
def _stats(session: ChatSession, args: str) -> CommandResult:
    engine = session.engine
    engine.wait_for_update()
    turns = engine.history
    speeds = [t.tokens_per_second for t in turns if t.generation_tokens > 0]
    updates = [t.update for t in turns if t.update is not None and not t.update.skipped]
    rows = [
        ("turns", str(len(turns))),
        ("tokens/s", f"{statistics.fmean(speeds):.1f} mean over {len(speeds)} replies" if speeds else "-"),
        ("update time", f"{statistics.median(u.seconds for u in updates):.3f}s median over {len(updates)}"
         if updates else "-"),
        ("memory updates", f"{len(updates)} this session, {engine.module.update_count} in the loaded memory"),
    ]
    skipped = sum(1 for t in turns if t.update is not None and t.update.skipped)
    if skipped:
        rows.append(("skipped", f"{skipped} (incognito or nothing surprising)"))
    return _report(rows)


@command("exit", "/exit", "save the memory and leave (/quit and Ctrl+D too; Ctrl+C at an empty prompt leaves unsaved)")
def _exit(session: ChatSession, args: str) -> CommandResult:
    return CommandResult(exit=True)


@dataclass
class Completion:
    """One completion candidate for a partly typed command line."""

    text: str  # what replaces the word being completed
    start: int  # negative offset from the cursor where the replaced word starts
    meta: str = ""


def complete(line: str, users: Callable[[], list[str]] = known_users) -> list[Completion]:
    """Completions for a command line typed so far (names, then obvious first arguments).

    Paths are left to the caller (`Command.arg == "path"`); returns [] when not a command.
    """
    if not line.startswith("/"):
        return []
    head, space, rest = line[1:].partition(" ")
    if not space:
        return [Completion(f"/{c.name}", -len(line), c.help) for c in COMMANDS.values()
                if c.name.startswith(head.lower())]
    entry = COMMANDS.get(head.lower())
    if entry is None or " " in rest.strip():
        return []
    choices = list(entry.choices) or (users() if entry.arg == "user" else [])
    return [Completion(c, -len(rest), "") for c in choices if c.startswith(rest) and c != rest]
