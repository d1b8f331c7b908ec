"""Typed records of what the memory saw and learned, written as JSONL.

Owns the record types (`ActivationRecord`, `UpdateRecord`, `ConsolidationRecord`) and `EventLog`, an append-only
writer that reports its first failure once on stderr and then stays quiet, so that a full
disk or a bad path never breaks a chat. It does not decide what to log (the engine does).
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Literal


@dataclass
class ActivationRecord:
    """One call of the hooked layer: slices of its input and output hidden states."""

    layer: int
    call_index: int
    backend: str
    model: str
    module: str
    phase: str
    shape: list[int]
    input_tail: list[list[float]]  # hidden_states[:, -1, -k:], per batch row
    output_tail: list[list[float]]
    time: float
    kind: Literal["activation"] = "activation"


@dataclass
class UpdateRecord:
    """One memory update after a user message.

    Field names follow the seed's log format, kept for compatibility: `stage` is `pre_hooks`
    (written before the module learns) or `post_hooks` (after), and `user_response_*` describe
    the user's message (not a reply): its content tokens and their cross-entropy given the chat
    before it, and `raw` the same for every token of the turn, template scaffolding included.
    `learner` says which kind of update ran: `surprise` (the selected tokens, loss before and
    after, per-step losses) or `direct` (the statements `stored`, and a one-line `note`).
    """

    stage: Literal["pre_hooks", "post_hooks"]
    turn: int
    backend: str
    model: str
    module: str
    layer: int
    user_text: str
    time: float
    user_response_target_token_ids: list[int] = field(default_factory=list)
    user_response_token_losses: list[float] = field(default_factory=list)
    user_response_token_loss_by_decoded_token: dict[str, float] = field(default_factory=dict)
    user_response_raw_target_token_ids: list[int] = field(default_factory=list)
    user_response_raw_token_losses: list[float] = field(default_factory=list)
    selected_token_ids: list[int] = field(default_factory=list)
    selected_tokens: list[str] = field(default_factory=list)
    loss: float | None = None  # mean CE of the selected tokens before the update
    loss_after: float | None = None
    step_losses: list[float] = field(default_factory=list)
    grad_norms: dict[str, float] = field(default_factory=dict)
    update_seconds: float | None = None
    skipped: str | None = None  # why no update was made (incognito, nothing to learn, ...)
    learner: Literal["surprise", "direct"] = "surprise"
    stored: list[str] = field(default_factory=list)
    note: str | None = None
    kind: Literal["update"] = "update"


@dataclass
class ConsolidationRecord:
    """One statement consolidated into a gradient module (`--consolidate`): the questions the frozen
    model asked and answered reading it, those dropped (the answer did not use the statement), the
    answers' mean CE without the statement before and after, the drift on held-out guard prompts,
    whether the consolidation was undone for it, and its time."""

    turn: int
    backend: str
    model: str
    module: str
    layer: int
    statement: str
    time: float
    examples: list[list[str]] = field(default_factory=list)  # [question, answer]
    dropped: list[list[str]] = field(default_factory=list)
    loss: float | None = None
    loss_after: float | None = None
    drift: float | None = None
    rolled_back: bool = False
    updates: int = 0
    update_seconds: float | None = None
    kind: Literal["consolidation"] = "consolidation"


def loss_by_decoded_token(tokens: list[str], losses: list[float]) -> dict[str, float]:
    """Map decoded tokens to their loss; repeats get `#2`, `#3`, ... suffixes."""
    out: dict[str, float] = {}
    seen: dict[str, int] = {}
    for tok, loss in zip(tokens, losses, strict=True):
        seen[tok] = seen.get(tok, 0) + 1
        out[tok if seen[tok] == 1 else f"{tok}#{seen[tok]}"] = loss
    return out


class EventLog:
    """Append-only JSONL writer; thread-safe; never raises on write."""

    def __init__(self, path: Path | None, activation_tail: int = 5) -> None:
        self.path = path
        self.activation_tail = activation_tail
        self._fh: IO[str] | None = None
        self._failed = path is None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return not self._failed

    def write(self, record: ActivationRecord | UpdateRecord | ConsolidationRecord) -> None:
        if self._failed:
            return
        with self._lock:
            try:
                if self._fh is None:
                    assert self.path is not None
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._fh = self.path.open("a", encoding="utf-8")
                self._fh.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
                self._fh.flush()
            except (OSError, TypeError, ValueError) as exc:
                self._failed = True
                print(f"lmm: event log disabled, cannot write {self.path}: {exc}", file=sys.stderr)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.close()
                except OSError as exc:
                    print(f"lmm: closing event log {self.path} failed: {exc}", file=sys.stderr)
                self._fh = None
