"""The memory-module contract: what every module receives, provides and saves.

Owns `MemoryConfig` (dataclass base with validation and dict round-trip), the life cycle the
engine drives (`attach`, `before_reply`, learning, `reset_session`, state), the two kinds of
module and what each learns from: `MemoryModule` learns from the message's surprising tokens
(`learn(LearnBatch)`; `GradientMemory` with optimizer steps) and `DirectMemory` writes what
the user said into memory itself (`write(messages, index)`), plus the shared surprising-token
selection. It does not own any concrete module, the model (a module sees `lmm.types.ModelView`)
or persistence to disk (`lmm.state`).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from lmm.ops import Array, Ops, Params
from lmm.types import ModelView, Phase, RewriteContext

__all__ = ["DirectMemory", "GradientConfig", "GradientMemory", "LearnBatch", "LearnResult", "MemoryConfig",
           "MemoryItem", "MemoryModule", "ModelView", "Phase", "RewriteContext", "StateError", "WriteResult",
           "select_surprising"]

Kind = Literal["surprise", "direct"]


class StateError(ValueError):
    """A state file or tensor set does not fit this module."""


@dataclass
class MemoryConfig:
    """Base of every module config. Subclasses add fields and check them in `__post_init__`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def upgrade(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Options saved by an older version, rewritten for this one (a module that retired or
        changed an option overrides this; the default keeps them as they are)."""
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MemoryConfig:
        values = cls.upgrade(dict(values))
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"unknown option(s) for {cls.__name__}: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known)) or 'none'})"
            )
        return cls(**values)

    @classmethod
    def from_strings(cls, options: dict[str, str]) -> MemoryConfig:
        """Build from `key=value` strings (the CLI's --mm-opt), coercing to each field's type."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in known:
                raise ValueError(
                    f"unknown option {key!r} for {cls.__name__} (known: {', '.join(sorted(known)) or 'none'})"
                )
            values[key] = coerce_option(raw, known[key].default, key)
        return cls(**values)


def coerce_option(raw: str, default: Any, key: str) -> Any:
    """A `key=value` option string as the type of its default (bool, int, float; else the string)."""
    try:
        if isinstance(default, bool):
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"option {key}={raw!r}: expected {type(default).__name__}") from None
    return raw


@dataclass
class LearnBatch:
    """One user message, ready to learn from.

    `input_ids` are the tokens fed on top of the cached chat prefix (they start with the last
    prefix token so that every message token has a prediction). `positions[i]` is the index
    in `input_ids` whose output predicts `target_ids[i]`. `hidden` holds the hooked layer's
    input hidden states for `input_ids` ([T, d], from the scoring pass).
    """

    input_ids: list[int]
    positions: list[int]
    target_ids: list[int]
    hidden: Array
    loss: Callable[[Params], Array]  # mean CE on the targets with these parameters bound
    token_losses: list[float] = field(default_factory=list)  # CE of each target before the update
    messages: Sequence[dict[str, str]] = ()  # the chat up to this message (system prompt included)
    index: int = -1  # position of this message in `messages` (its text: messages[index]["content"])


@dataclass
class LearnResult:
    steps: int
    losses: list[float]  # loss at each step, before that step's parameter change
    grad_norms: dict[str, float]  # of the first step, per parameter


@dataclass
class MemoryItem:
    """One thing a memory holds that a person can see and delete (a stored statement)."""

    text: str
    said_at: float | None = None  # Unix time the user said it, when known
    last_read: int | None = None  # how recently it was read, as the module's clock (larger: more recent)
    replaced_by: int | None = None  # the item number (1-based, oldest first) of the newer item that superseded it


@dataclass(frozen=True)
class ReadItem:
    """A stored item that a reply read: its number as `/memory` lists it (1-based) and its text."""

    number: int
    text: str


@dataclass
class WriteResult:
    """What a `DirectMemory` write did with one user message."""

    stored: list[str] = field(default_factory=list)  # the statements written (or rewritten)
    note: str = ""  # one line for the user: what was stored, replaced, or why nothing was
    dropped: list[str] = field(default_factory=list)  # what the memory let go to make room (never silently)


def select_surprising(losses: np.ndarray) -> np.ndarray:
    """Indices of the tokens whose CE is strictly above the mean CE of the message."""
    if losses.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(losses > losses.mean())


class MemoryModule(ABC):
    """A rewrite of one layer's hidden states that learns from the user's surprising tokens.

    Parameters live in `self.params` (trained and saved); other saved tensors go in
    `self.buffers`. During a gradient step the backend binds traced parameters with
    `bound()`, and `rewrite` must read them through `self.p`.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[MemoryConfig]]
    kind: ClassVar[Kind] = "surprise"  # which learner the engine runs after each user message
    # Saved buffers named `*_at` hold wall-clock times: two runs of the same session differ there.
    # buffers that are per-session and not part of the saved state
    transient_buffers: ClassVar[tuple[str, ...]] = ()
    # True: `load_state_tensors` takes read-only views of the mapped state file and copies what it changes
    maps_state: ClassVar[bool] = False

    def __init__(self, config: MemoryConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        self.config = config
        self.hidden_size = hidden_size
        self.ops = ops
        self.seed = seed
        self.params: Params = {}
        self.buffers: dict[str, Array] = {}
        self.update_count = 0
        self._bound: Params | None = None

    @property
    def p(self) -> Params:
        return self._bound if self._bound is not None else self.params

    @contextmanager
    def bound(self, params: Params) -> Iterator[None]:
        previous, self._bound = self._bound, {**self.params, **params}
        try:
            yield
        finally:
            self._bound = previous

    @abstractmethod
    def rewrite(self, hidden: Array, ctx: RewriteContext) -> Array:
        """Map hidden states [B, T, d] to hidden states of the same shape and dtype."""

    def learn(self, batch: LearnBatch) -> LearnResult:
        """Learn from one message. The default module has nothing to learn."""
        return LearnResult(steps=0, losses=[], grad_norms={})

    def attach(self, model: ModelView, layer: int) -> None:
        """The engine installed this module on `model` at `layer`. A module that runs passes of
        its own (captures, extra keys/values) keeps the view; the default does nothing."""

    def before_reply(self, messages: Sequence[dict[str, str]]) -> None:
        """The engine is about to generate a reply to `messages` (the chat, system prompt
        included): prepare what it needs, e.g. retrieve. The default does nothing."""

    def reset_session(self) -> None:
        """Forget per-session (short-term) state; learned memory stays."""

    def reset_learner(self) -> None:
        """Drop what the learner carries between updates (optimizer moments): called when an
        update is rolled back, since they were moved by it. The default holds nothing."""

    def items(self) -> list[MemoryItem]:
        """What the memory holds as separate items, oldest first. A module whose memory lives in
        weights has none to list."""
        return []

    def last_read(self) -> list[ReadItem]:
        """The items the last `before_reply` read (so that a user can see, and `/forget`, a wrong
        one). A module whose memory lives in weights reads no separate items: the default is []."""
        return []

    def forget_item(self, index: int) -> str:
        """Delete item `index` (0-based, as `items()` lists them); return its text."""
        raise ValueError(f"{self.name} keeps no separate items (its memory is in its weights); "
                         "/forget resets all of it")

    def summary(self) -> dict[str, Any]:
        """Figures for `/memory` and benchmark reports."""
        return {}

    # --- state -----------------------------------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        out = {f"param.{k}": self.ops.to_numpy(v) for k, v in self.params.items()}
        for k, v in self.buffers.items():
            if k not in self.transient_buffers:
                out[f"buffer.{k}"] = self.ops.to_numpy(v)
        return out

    def load_state_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Replace params and buffers. Shapes of fixed-size tensors must match the config."""
        expected = set(self.state_tensors())
        missing = sorted(expected - set(tensors))
        if missing:
            raise StateError(f"state is missing tensor(s) {', '.join(missing)} for module {self.name}")
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            target = self.params if kind == "param" else self.buffers if kind == "buffer" else None
            if target is None:
                raise StateError(f"unexpected tensor {key!r} in state for module {self.name}")
            current = target.get(name)
            if current is not None and tuple(current.shape) != value.shape and not self._resizable(name):
                raise StateError(
                    f"tensor {key} has shape {value.shape}, module {self.name} expects {tuple(current.shape)}"
                )
            target[name] = self.ops.asarray(value, dtype=str(value.dtype))
        self._after_load()

    def _resizable(self, name: str) -> bool:
        """Tensors whose size grows with what was learned (e.g. written hash rows)."""
        return False

    def _after_load(self) -> None:
        """Rebuild derived structures after a load."""


class DirectMemory(MemoryModule):
    """A module that writes what the user said into memory itself (no gradient, no token
    selection): the engine calls `write` after each user message."""

    kind: ClassVar[Kind] = "direct"

    @abstractmethod
    def write(self, messages: Sequence[dict[str, str]], index: int) -> WriteResult:
        """Store what `messages[index]` (a user message) says; `messages` is the chat up to it."""


class GradientMemory(MemoryModule):
    """A module that learns by a few optimizer steps on the selected tokens' loss.

    Subclasses say which parameters an update trains (`trainable`) and how the trained
    values are written back (`commit`). The optimizer state persists across updates for
    parameters whose shape does not change.
    """

    def __init__(self, config: MemoryConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        super().__init__(config, hidden_size=hidden_size, ops=ops, seed=seed)
        from lmm.optim import make_optimizer

        cfg: Any = config
        self.optimizer = make_optimizer(cfg.optimizer, ops, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._steps: int = cfg.steps

    @contextmanager
    def schedule(self, lr: float | None = None, steps: int | None = None) -> Iterator[None]:
        """Learn with this learning rate and number of steps per update inside (None: the config's);
        consolidation trains on its own schedule."""
        cfg: Any = self.config
        previous = self.optimizer.lr, self._steps
        self.optimizer.lr = cfg.lr if lr is None else lr
        self._steps = cfg.steps if steps is None else steps
        try:
            yield
        finally:
            self.optimizer.lr, self._steps = previous

    def trainable(self, batch: LearnBatch) -> Params:
        return dict(self.params)

    @contextmanager
    def consolidating(self, questions: Sequence[str], unrelated: Sequence[str], *,
                      statement: str = "") -> Iterator[None]:
        """One statement's consolidation runs inside, with the questions it trains on, prompts whose
        replies it must leave alone, and the statement itself. A module whose structure routes may give
        the statement slots of its own here (chaptered_bank's fact chapters); the default trains what
        `trainable` picks."""
        yield

    def affects(self, text: str) -> bool:
        """Whether the module may change the reply to a chat whose last user message is `text`. A module
        that knows it leaves a prompt exactly alone says False, and the learner skips that prompt."""
        return True

    def reset_learner(self) -> None:
        self.optimizer.reset()

    def commit(self, params: Params, batch: LearnBatch) -> None:
        self.params.update(params)

    def learn(self, batch: LearnBatch) -> LearnResult:
        params = self.trainable(batch)
        losses: list[float] = []
        grad_norms: dict[str, float] = {}
        for step in range(self._steps):
            loss, grads = self.ops.value_and_grad(batch.loss, params)
            losses.append(float(self.ops.to_numpy(loss)))
            if step == 0:
                grad_norms = {k: float(np.linalg.norm(self.ops.to_numpy(g))) for k, g in grads.items()}
            params = self.optimizer.step(params, grads)
            self.ops.evaluate(params)
        self.commit(params, batch)
        self.update_count += 1
        return LearnResult(steps=self._steps, losses=losses, grad_norms=grad_norms)


@dataclass
class GradientConfig(MemoryConfig):
    """Options shared by modules that learn with optimizer steps."""

    lr: float = 1e-3
    steps: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.optimizer not in {"adamw", "adam", "sgd"}:
            raise ValueError(f"optimizer must be one of adamw, adam, sgd; got {self.optimizer!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
