"""`chaptered_bank`'s fact chapters: one small chapter per consolidated statement, opened by a gate.

Owns what consolidation (`lmm.consolidation`, issue #14) adds to the seed bank: for each statement, a
chapter of `fact_slots` slots (keys and values of the hidden size, values zero at first, so a new
chapter changes nothing) trained on the teacher's answers, and its gate: a route (the unit mean of the
training questions' and the statement's states, centred) and a threshold (the best cosine of any generic
message, plus `fact_margin`: the unrelated prompts the learner must leave alone, the neutral calibration
messages and the write gate's examples of what does not inform; and of any general-knowledge question or
sum, plus `fact_question_margin`). A reply reads the `fact_top_k` chapters whose gate the user's message
passes, nearest first, with the cosine taken on the same feature (the frozen model's mean state of the
message's content tokens entering the module's layer), decided once in `before_reply`; every other reply
reads none, so it is the seed bank's alone. The seed's top-k chapters route by the running mean of every
position and share one output projection, so what a statement taught them reached unrelated replies
(docs/consolidation.md); a gate per statement keeps it to its questions.

Without `--consolidate` no fact chapter exists and the module is the seed's, unchanged. It owns no
learner (the consolidator drives `consolidating`) and no seed routing (`chaptered_bank`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from lmm.memory.base import StateError
from lmm.memory.trace_gate import OTHER, content_state
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
EPS = 1e-6


class FactChapters:
    """The fact-chapter half of `ChapteredBank` (which sets the attributes below): the module contract's
    `attach`, `before_reply` and `consolidating` are this half's."""

    cfg: Any  # ChapteredBankConfig
    ops: Ops
    hidden_size: int
    seed: int
    params: Params
    buffers: dict[str, Array]
    model: ModelView | None
    layer: int | None
    _open: list[int]
    _fact: int | None
    _states: dict[str, np.ndarray]
    p: Params  # MemoryModule's: the bound parameters during a gradient step

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
    def _state(self, text: str) -> np.ndarray:
        """The gate's feature of `text` as a lone user turn (frozen model; cached, it never changes)."""
        cached = self._states.get(text)
        if cached is None:
            if self.model is None or self.layer is None:
                raise RuntimeError("chaptered_bank's fact chapters need the model (ChatEngine attaches it)")
            if len(self._states) >= 1024:
                self._states.clear()
            cached = self._states[text] = content_state(self.model, self.layer, text)
        return cached

    def _references(self, unrelated: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The states of the generic messages (`unrelated`, the calibration messages, then the write gate's
        examples of what does not inform) and of the general questions: the same for every chapter, so
        taken once per loaded model rather than through `_state`'s cache, which a long chat empties."""
        if self.model is None or self.layer is None:
            raise RuntimeError("chaptered_bank's fact chapters need the model (ChatEngine attaches it)")
        model, layer = self.model, self.layer

        def states(texts: Sequence[str]) -> np.ndarray:
            return np.stack([content_state(model, layer, t) for t in texts])

        key = ("chaptered_facts.references", layer, tuple(unrelated))
        return model.memo(key, lambda: (states((*unrelated, *CALIBRATION, *OTHER)), states(GENERAL_QUESTIONS)))

    def _cosines(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Cosine of `text`'s centred state with every fact chapter's route, and the chapters' thresholds."""
        center = self.ops.to_numpy(self.buffers["fact_center"])
        route = self.ops.to_numpy(self.buffers["fact_route"])
        return route @ normalize(self._state(text) - center), self.ops.to_numpy(self.buffers["fact_threshold"])

    def opened(self, text: str) -> list[int]:
        """The fact chapters a message `text` reads: those whose gate it passes, nearest first."""
        if not self.fact_count or not text.strip():
            return []
        cos, threshold = self._cosines(text)
        # Ranked by cosine, not by margin: a chapter whose questions are far from every generic message
        # has a low threshold and, ranked by margin, came first for other facts' questions too.
        order = [int(i) for i in np.argsort(-cos) if cos[i] >= threshold[i]]
        return order[: self.cfg.fact_top_k]

    def attach(self, model: ModelView, layer: int) -> None:
        self.model, self.layer = model, layer

    def before_reply(self, messages: Sequence[dict[str, str]]) -> None:
        users = [m["content"] for m in messages if m.get("role") == "user"]
        self._open = self.opened(users[-1]) if users else []

    # --- a new chapter ------------------------------------------------------------------------
    @contextmanager
    def consolidating(self, questions: Sequence[str], unrelated: Sequence[str], *,
                      statement: str = "") -> Iterator[None]:
        """Open a chapter for one statement: its route from `questions` and the statement, its threshold
        above every generic message (`unrelated` among them); score and train passes inside read it (and
        only it)."""
        ops, d = self.ops, self.hidden_size
        generic, general = self._references(unrelated)
        if "fact_center" not in self.buffers:  # fixed at the first fact, so earlier routes stay valid
            center = generic[: len(unrelated) + len(CALIBRATION)].mean(axis=0)  # the unrelated and calibration rows
            self.buffers["fact_center"] = ops.asarray(center.astype(np.float32))
        center = ops.to_numpy(self.buffers["fact_center"])
        # The statement counts as one more question: the teacher's questions are often odd ("What does I
        # support?"), and the statement carries the words a user's question shares (dev gates: 15 -> 20 own).
        texts = [*questions, statement] if statement.strip() else list(questions)
        route = normalize(np.stack([self._state(t) for t in texts]).mean(axis=0) - center)
        # Above every generic message at hand: the learner's unrelated prompts, the neutral calibration
        # messages and the write gate's examples of what does not inform (questions, requests, small talk).
        threshold = max(float((normalize(generic - center) @ route).max()) + self.cfg.fact_margin,
                        float((normalize(general - center) @ route).max()) + self.cfg.fact_question_margin)
        i = self.fact_count
        old_route = ops.to_numpy(self.buffers["fact_route"]) if i else np.zeros((0, d), np.float32)
        old_thr = ops.to_numpy(self.buffers["fact_threshold"]) if i else np.zeros((0,), np.float32)
        self.buffers["fact_route"] = ops.asarray(np.concatenate([old_route, route[None]]).astype(np.float32))
        self.buffers["fact_threshold"] = ops.asarray(
            np.append(old_thr, threshold).astype(np.float32))
        rng = np.random.default_rng([self.seed, i])
        self.params[f"fact{i}.keys"] = ops.asarray(rng.normal(size=(self.cfg.fact_slots, d)).astype(np.float32))
        self.params[f"fact{i}.values"] = ops.zeros((self.cfg.fact_slots, d))
        self._fact = i
        try:
            yield
        finally:
            self._fact = None

    def _fact_trainable(self) -> Params:
        i = self._fact
        return {f"fact{i}.keys": self.params[f"fact{i}.keys"], f"fact{i}.values": self.params[f"fact{i}.values"]}

    # --- reading ----------------------------------------------------------------------------------
    def _fact_read(self, x: Array, rms: Array, ctx: RewriteContext) -> Array | None:
        """What the open fact chapters add to hidden states `x` [B, T, d] (None: none open)."""
        if ctx.phase == "generate" or self._fact is None:
            chapters = self._open
        else:
            chapters = [self._fact]
        if not chapters:
            return None
        ops, p, d = self.ops, self.p, self.hidden_size
        q = x - self.buffers["fact_center"]
        q = q * (float(np.sqrt(d)) / (ops.norm(q, axis=-1, keepdims=True) + EPS))
        b, t, _ = x.shape
        total = None
        for i in chapters:
            logits = q @ ops.swapaxes(p[f"fact{i}.keys"], 0, 1) / float(np.sqrt(d))  # [B, T, S]
            attn = ops.softmax(ops.concat([logits, ops.zeros((b, t, 1))], axis=-1), axis=-1)[..., :-1]
            read = rms * (attn @ p[f"fact{i}.values"]) * self.cfg.fact_scale
            total = read if total is None else total + read
        return total

    def _check_facts(self) -> None:
        """A loaded state has the keys and values of every chapter its gates name."""
        missing = [f"fact{i}.{f}" for i in range(self.fact_count) for f in ("keys", "values")
                   if f"fact{i}.{f}" not in self.params]
        if missing:
            raise StateError(f"state is missing tensor(s) {', '.join('param.' + m for m in missing[:4])} "
                             "for chaptered_bank's fact chapters")

    def fact_summary(self) -> dict[str, Any]:
        return {"fact_chapters": self.fact_count, "fact_open": list(self._open)}
