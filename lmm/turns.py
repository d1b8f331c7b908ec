"""What one chat turn gives back: each generated token as it comes, and the finished turn.

Owns `GenerationResponse` (one token, mlx-lm style) and `TurnResult` (the reply, its speed figures, what
the memory read for it and the memory update that followed it). It holds no logic: the engine fills them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmm.learning import UpdateSummary
from lmm.memory.base import ReadItem


@dataclass
class GenerationResponse:
    """One generated token (mlx-lm style): the text it completes (empty while a UTF-8 sequence is
    unfinished), the running figures, and on the reply's last token why it ended."""

    text: str
    token: int
    generation_tokens: int
    generation_tps: float
    finish_reason: str | None = None  # "stop", "length" or "interrupted" on the last token


@dataclass
class TurnResult:
    user: str
    assistant: str
    generation_tokens: int
    tokens_per_second: float
    time_to_first_token: float
    finish_reason: str
    update: UpdateSummary | None = None
    tokens: list[int] = field(default_factory=list)  # the reply's token ids
    read: list[ReadItem] = field(default_factory=list)  # stored items the memory read for this reply

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user, "assistant": self.assistant, "generation_tokens": self.generation_tokens,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "time_to_first_token": round(self.time_to_first_token, 4), "finish_reason": self.finish_reason,
            "update": self.update.to_json() if self.update else None,
            "read": [{"item": r.number, "text": r.text} for r in self.read],
        }
