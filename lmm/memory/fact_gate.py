"""Fact gates: what consolidation (`lmm.consolidation`, issue #14) adds to a gradient module, one gated
set of parameters per consolidated statement.

Owns, for each statement, the gate: a route (the unit mean of the training questions' states, the
statement's and the question `lmm.memory.question_map` predicts from it, centred) and a threshold (the
best cosine of any generic message, plus `fact_margin`: the unrelated prompts the learner must leave
alone, the neutral calibration messages and the write gate's examples of what does not inform; and of
any general-knowledge question or sum, plus
`fact_question_margin`). A reply reads the `fact_top_k` facts whose gate the user's message passes,
nearest first, with the cosine taken on the same feature (the frozen model's mean state of the message's
content tokens entering the module's layer), decided once in `before_reply`; every other reply reads
none, so it is the seed module's alone. What a fact holds is the module's own (`new_fact`, read where its
`rewrite` asks `facts_read`): `chaptered_bank` a small chapter of slots, `lora_on_user` a low-rank
correction, `hash_gradient` a coarse table of rows, `recurrent_state` a readout of its state. Without
a gate, what a statement taught a module reached unrelated replies, and the drift check undid it
(docs/consolidation.md).

Without `--consolidate` no fact exists and the module is the seed's, unchanged. It owns no learner (the
consolidator drives `consolidating`) and no module's parameters or reading.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lmm.memory.base import GradientConfig, MemoryModule, StateError
from lmm.memory.question_map import question_map
from lmm.memory.trace_gate import OTHER, content_state, content_states
from lmm.memory.traces import CALIBRATION, normalize
from lmm.ops import Array, Ops, Params
from lmm.types import ModelView, RewriteContext

FACT_BUFFERS = ("fact_route", "fact_threshold", "fact_center")
# General-knowledge questions and sums, the messages closest in form to a fact's questions ("What is
# my PIN?" and "What is 9 squared?" differ in one word); a chapter's threshold also clears them.
# Generic, written for the gate: none is a benchmark or development prompt.
GENERAL_QUESTIONS = (
    "Calculate 45 minus 18.", "What is 6 multiplied by 7?", "How much is 250 divided by 10?",
    "What is 2 to the power of 5?", "How many days are in a leap year?", "How many centimetres are in a metre?",
    "How many months have 31 days?", "What is the population of London?", "How old is the Eiffel Tower?",
    "When did the Second World War end?", "How tall is Mount Everest?", "How far is the moon from the Earth?",
    "What is the speed of sound?", "How many teeth does an adult have?", "What number comes after 99?",
    "Convert 5 miles to kilometres.", "What is the area of a square with sides of 4?",
    "What time zone is New York in?", "Who invented the telephone?", "What is the biggest country in the world?",
    "Where do penguins live?", "What is the chemical formula for salt?", "How do I reset my password?",
    "What does a dentist do?", "Which sport uses a shuttlecock?", "What is the name of our galaxy?",
    "Who is the author of Harry Potter?", "What is the national animal of Scotland?",
    "What is a synonym for 'big'?", "How do you spell 'rhythm'?", "What is the meaning of 'serendipity'?",
    "Where is the Taj Mahal?", "How many languages are spoken in India?", "What year was the internet invented?",
    "What is the average human body temperature?", "Which month has the fewest days?",
    "What is the product of 8 and 5?", "How many zeros are in a million?", "What is the age of the oldest tree?",
    "Name a famous scientist.",
)


@dataclass
class FactGateConfig(GradientConfig):
    """Options of a module's fact gates (used only with `--consolidate`)."""

    fact_margin: float = 0.15  # a message opens a fact past the best unrelated prompt's cosine by this much
    fact_question_margin: float = 0.10  # ... and past the best general-knowledge question's by this much
    fact_top_k: int = 1  # facts one reply reads at most (in a crowded memory a second was most often wrong)
    fact_map: bool = True  # the route also holds the question `question_map` predicts from the statement
    # > 0: consolidation also trains the statement's own surprising tokens (the seeds' selection: CE above
    # the statement's mean, before its fact is trained), said as the user's turn, with this weight.
    fact_statement_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.fact_margin <= 2.0:
            raise ValueError(f"fact_margin must be in [-1, 2], got {self.fact_margin}")
        if not -1.0 <= self.fact_question_margin <= 2.0:
            raise ValueError(f"fact_question_margin must be in [-1, 2], got {self.fact_question_margin}")
        if self.fact_statement_weight < 0:
            raise ValueError(f"fact_statement_weight must be >= 0, got {self.fact_statement_weight}")
        if self.fact_top_k < 1:
            raise ValueError(f"fact_top_k must be >= 1, got {self.fact_top_k}")


class FactGate:
    """Mixin placed before `GradientMemory`: the module contract's `attach`, `before_reply`, `consolidating`,
    `affects` and state loading for modules with fact gates. The module calls `init_facts()` in its
    constructor, names its per-fact parameters in `fact_fields` and builds them in `new_fact`."""

    fact_fields: ClassVar[tuple[str, ...]]
    config: Any  # a FactGateConfig
    ops: Ops
    hidden_size: int
    seed: int
    name: str
    params: Params
    buffers: dict[str, Array]
    p: Params  # MemoryModule's: the bound parameters during a gradient step

    def init_facts(self) -> None:
        self.model: ModelView | None = None
        self.layer: int | None = None
        self._open: list[int] = []  # facts the current reply reads
        self._fact: int | None = None  # the fact being consolidated
        self._states: dict[str, np.ndarray] = {}

    def new_fact(self, i: int, rng: np.random.Generator) -> Params:
        """Parameters of fact `i`, named `fact{i}.<field>` for each of `fact_fields`; a new fact must
        change nothing until trained."""
        raise NotImplementedError

    def seed_trained(self) -> bool:
        """Whether the seed's own update ever changed the module (then it may change any reply)."""
        raise NotImplementedError

    # --- what exists ------------------------------------------------------------------------
    @property
    def fact_count(self) -> int:
        route = self.buffers.get("fact_route")
        return 0 if route is None else int(route.shape[0])

    def _is_fact_tensor(self, name: str) -> bool:
        return name.startswith("fact") and (name in FACT_BUFFERS or name.split(".")[0][4:].isdigit())

    def _drop_facts(self) -> None:
        for store in (self.params, self.buffers):
            for name in [n for n in store if self._is_fact_tensor(n)]:
                del store[name]
        self._open, self._fact = [], None

    # --- the gate ---------------------------------------------------------------------------
    def _model(self) -> tuple[ModelView, int]:
        if self.model is None or self.layer is None:
            raise RuntimeError(f"{self.name}'s fact gates need the model (ChatEngine attaches it)")
        return self.model, self.layer

    def _state(self, text: str) -> np.ndarray:
        """The gate's feature of `text` as a lone user turn (frozen model; cached, it never changes)."""
        cached = self._states.get(text)
        if cached is None:
            model, layer = self._model()
            if len(self._states) >= 1024:
                self._states.clear()
            cached = self._states[text] = content_state(model, layer, text)
        return cached

    def _references(self, unrelated: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The states of the generic messages (`unrelated`, the calibration messages, then the write gate's
        examples of what does not inform) and of the general questions: the same for every fact, so
        taken once per loaded model rather than through `_state`'s cache, which a long chat empties."""
        model, layer = self._model()
        key = ("fact_gate.references", layer, tuple(unrelated))
        return model.memo(key, lambda: (content_states(model, layer, (*unrelated, *CALIBRATION, *OTHER)),
                                        content_states(model, layer, GENERAL_QUESTIONS)))

    def _cosines(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Cosine of `text`'s centred state with every fact's route, and the facts' thresholds."""
        center = self.ops.to_numpy(self.buffers["fact_center"])
        route = self.ops.to_numpy(self.buffers["fact_route"])
        return route @ normalize(self._state(text) - center), self.ops.to_numpy(self.buffers["fact_threshold"])

    def passed(self, text: str) -> list[int]:
        """Every fact whose gate a message `text` passes, nearest first."""
        if not self.fact_count or not text.strip():
            return []
        cos, threshold = self._cosines(text)
        # Ranked by cosine, not by margin: a fact whose questions are far from every generic message
        # has a low threshold and, ranked by margin, came first for other facts' questions too.
        return [int(i) for i in np.argsort(-cos) if cos[i] >= threshold[i]]

    def opened(self, text: str) -> list[int]:
        """The facts a message `text` reads: the `fact_top_k` nearest of those it passes."""
        return self.passed(text)[: self.config.fact_top_k]

    def attach(self, model: ModelView, layer: int) -> None:
        self.model, self.layer = model, layer

    def before_reply(self, messages: Sequence[dict[str, str]]) -> None:
        users = [m["content"] for m in messages if m.get("role") == "user"]
        self._open = self.opened(users[-1]) if users else []

    def affects(self, text: str) -> bool:
        """False when the seed's update never ran and no fact opens for `text`."""
        return self.seed_trained() or bool(self.opened(text))

    def facts_read(self, ctx: RewriteContext) -> list[int]:
        """The facts a forward reads: the one being consolidated in its score and train passes, else the
        ones the reply's gate opened."""
        if ctx.phase == "generate" or self._fact is None:
            return self._open
        return [self._fact]

    # --- a new fact ---------------------------------------------------------------------------
    @contextmanager
    def consolidating(self, questions: Sequence[str], unrelated: Sequence[str], *,
                      statement: str = "") -> Iterator[None]:
        """Open a fact for one statement: its route from `questions` and the statement, its threshold
        above every generic message (`unrelated` among them); score and train passes inside read it (and
        only it)."""
        ops, d, cfg = self.ops, self.hidden_size, self.config
        generic, general = self._references(unrelated)
        if "fact_center" not in self.buffers:  # fixed at the first fact, so earlier routes stay valid
            center = generic[: len(unrelated) + len(CALIBRATION)].mean(axis=0)  # the unrelated and calibration rows
            self.buffers["fact_center"] = ops.asarray(center.astype(np.float32))
        center = ops.to_numpy(self.buffers["fact_center"])
        # The statement and the question the map predicts from it count as two more questions: the
        # teacher's are often off-point ("What is my name?" about a move), and the statement carries the
        # words a user's question shares (dev, 32 facts: own questions opening their gate 23 -> 27).
        states = [self._state(t) for t in questions]
        if statement.strip():
            said = self._state(statement)
            states += [said, question_map(*self._model()).predict(said)] if cfg.fact_map else [said]
        route = normalize(np.stack(states).mean(axis=0) - center)
        # Above every generic message at hand: the learner's unrelated prompts, the neutral calibration
        # messages and the write gate's examples of what does not inform (questions, requests, small talk).
        threshold = max(float((normalize(generic - center) @ route).max()) + cfg.fact_margin,
                        float((normalize(general - center) @ route).max()) + cfg.fact_question_margin)
        i = self.fact_count
        old_route = ops.to_numpy(self.buffers["fact_route"]) if i else np.zeros((0, d), np.float32)
        old_thr = ops.to_numpy(self.buffers["fact_threshold"]) if i else np.zeros((0,), np.float32)
        self.buffers["fact_route"] = ops.asarray(np.concatenate([old_route, route[None]]).astype(np.float32))
        self.buffers["fact_threshold"] = ops.asarray(np.append(old_thr, threshold).astype(np.float32))
        self.params.update(self.new_fact(i, np.random.default_rng([self.seed, i])))
        self._fact = i
        try:
            yield
        finally:
            self._fact = None

    def fact_trainable(self) -> Params:
        """The parameters of the fact being consolidated (what its updates train)."""
        return {f"fact{self._fact}.{f}": self.params[f"fact{self._fact}.{f}"] for f in self.fact_fields}

    # --- state ----------------------------------------------------------------------------------
    def load_state_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        kept = [{n: v for n, v in store.items() if self._is_fact_tensor(n)} for store in (self.params, self.buffers)]
        self._drop_facts()  # the state brings its own (or none); a failed load puts these back
        try:
            self.load_module_state(tensors)
            self._check_facts()
        except StateError:
            self.params.update(kept[0])
            self.buffers.update(kept[1])
            raise

    def load_module_state(self, tensors: dict[str, np.ndarray]) -> None:
        """The module's own load (`MemoryModule.load_state_tensors` unless it stores tensors its own way)."""
        MemoryModule.load_state_tensors(self, tensors)  # type: ignore[arg-type]

    def _resizable(self, name: str) -> bool:
        return name in FACT_BUFFERS

    def _check_facts(self) -> None:
        """A loaded state has the parameters of every fact its gates name."""
        missing = [f"fact{i}.{f}" for i in range(self.fact_count) for f in self.fact_fields
                   if f"fact{i}.{f}" not in self.params]
        if missing:
            raise StateError(f"state is missing tensor(s) {', '.join('param.' + m for m in missing[:4])} "
                             f"for {self.name}'s consolidated facts")

    def fact_summary(self) -> dict[str, Any]:
        return {"facts": self.fact_count, "facts_open": list(self._open)}
