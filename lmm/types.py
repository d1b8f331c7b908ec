"""The small shared types where the backends and the memory modules meet.

Owns what crosses between `lmm.backends` and `lmm.memory` (which never import each other):
the phase of a forward pass and the context the layer hook receives, the hook's signature,
attention-level memory (extra keys/values to read, states captured from the frozen model),
and `ModelView`, the narrow view of the model a memory module is given. It holds no logic.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from lmm.ops import Array, Ops

Phase = Literal["generate", "score", "train"]
T = TypeVar("T")


@dataclass
class RewriteContext:
    """What the hook knows about the current forward pass."""

    phase: Phase
    offset: int  # positions already in the KV cache before this call


HookFn = Callable[[Array, RewriteContext], Array]  # hidden states [B, T, d] in, same shape out


@dataclass(frozen=True)
class ExtraKV:
    """Keys/values prepended to the attention of some layers for every following forward.

    `layers` maps a decoder layer index to (keys, values), each [1, n_kv_heads, L, head_dim] in
    the backend's array type with RoPE already applied (at the positions they were computed at).
    `key` identifies the content: the backend drops its session cache when it changes, since
    everything computed above the first extra layer depends on it. The queries at absolute
    positions >= `visible_from` see them."""

    key: Hashable
    layers: dict[int, tuple[Array, Array]]
    visible_from: int = 0


@dataclass
class Captured:
    """States of the frozen model on some tokens: per asked layer, the hidden states [T, d]
    entering it and the RoPE-applied (keys, values) [1, n_kv_heads, T, head_dim]."""

    hidden: dict[int, Array] = field(default_factory=dict)
    kv: dict[int, tuple[Array, Array]] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedTurn:
    """A text as the only user turn of a chat: token ids of the whole rendering (the template's
    own system prompt included), where the turn starts, and the positions of the text's tokens."""

    ids: list[int]
    start: int
    content: list[int]


class ModelView(Protocol):
    """What a memory module may ask of the model it is attached to (the engine hands it over)."""

    backend_name: str
    num_layers: int
    hidden_size: int
    ops: Ops

    def encode_turn(self, text: str) -> EncodedTurn:
        """`text` rendered as the only user message of a chat, tokenised."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def capture(self, ids: Sequence[int], *, hidden_layers: Sequence[int] = (),
                kv_layers: Sequence[int] = (), shift: int = 0) -> Captured:
        """Run the frozen model (no memory) on `ids` from an empty cache, in one forward; with `shift`,
        keys as if every token sat `shift` positions later."""
        ...

    def token_logprobs(self, batch: Sequence[Sequence[int]]) -> Any:
        """Per sequence `ids` of `batch`, one forward for all: log P(ids[i] | ids[:i]) for i >= 1 under
        the frozen model, a float32 numpy array each."""
        ...

    def read(self, extra: ExtraKV | None) -> None:
        """Let the attention read `extra` in every following forward (None: the plain path)."""
        ...

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """A value that depends on the frozen model only, computed once per loaded model."""
        ...

    def stored(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Arrays that depend on the frozen model only, computed once per model and kept on disk."""
        ...
