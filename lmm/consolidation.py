"""Consolidation: a gradient module learns to answer questions about a statement with the statement gone.

Owns the shared learner that every gradient module consolidates through (`Consolidator`): which
sentences of a user message are statements (`lmm.memory.trace_gate`'s split and write gate), the
student's examples from the teacher's questions and answers about a statement (`lmm.teacher`: the
frozen model reading it in a few-shot task), the student's loss (cross-entropy on
those answers asked with no statement, plus KL to the frozen model on unrelated guard prompts), and
the drift check that undoes a consolidation which moves other replies. The module's own learner
trains it (`MemoryModule.learn` with this loss): its `trainable` chooses what a question touches
(hash_gradient's rows, chaptered_bank's chapters), so routed modules write only the slots a question
selects. Nothing here is written per fact: the few-shot examples and guard prompts are generic and
share no benchmark wording. It does not schedule consolidation (the engine does) or save state.

Why distil instead of training on the statement: a model trained on a statement's own tokens learns to
complete the statement, not to answer questions about it (Allen-Zhu & Li, arXiv 2309.14316); the
teacher-with-context / student-without recipe is Padmanabhan et al. (arXiv 2306.09306) and Cartridges
(arXiv 2506.06266). The seeds' signal stays available beside it: a module's `fact_statement_weight`
adds the statement's own surprising tokens to what it learns (hash_gradient's default). docs/consolidation.md
has the measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np

from lmm.backends.base import Backend, DecodingConfig
from lmm.chat_format import Message
from lmm.events import ConsolidationRecord, EventLog
from lmm.hook import MemoryHook
from lmm.learning import UpdateSummary
from lmm.memory.base import GradientMemory, LearnBatch, coerce_option, select_surprising
from lmm.memory.trace_gate import digest, gate_score, is_question, sentences
from lmm.ops import Array, Params
from lmm.teacher import Teacher, TeacherConfig
from lmm.types import Phase

# Unrelated prompts the student must answer as the frozen model does: the first GUARD_TRAIN are in the
# loss, the rest only judge drift. None is a benchmark or development prompt.
GUARD_PROMPTS = (
    "What is the capital of Italy?", "How many minutes are in an hour?", "Name a primary colour.",
    "Subtract 5 from 12.", "Who painted the Mona Lisa?", "Write a short sentence about autumn.",
    "What is the opposite of 'early'?", "How do bees make honey?", "What language is spoken in Brazil?",
    "Explain what a noun is.", "Suggest a healthy breakfast.", "How many sides does a hexagon have?",
    "Tell me a fun fact about octopuses.", "Hello! How are you today?", "What does a thermometer measure?",
    "Write a greeting for a birthday card.",
    "Which planet is closest to the sun?", "What is the main ingredient of guacamole?",
    "How do you make a cup of tea?", "Thanks for your help!", "Add 9 and 6.",
    "Name an instrument with strings.", "What colour is a ripe banana?", "Who wrote the Odyssey?",
    "Give me a word that rhymes with 'light'.", "Name a vegetable that is orange.",
    "Describe a forest in one sentence.", "What is the tallest animal?",
)
GUARD_TRAIN = 16


@dataclass
class ConsolidationConfig:
    questions: int = 4  # questions sampled per statement (the first greedy, the others at `temperature`)
    forward_tries: int = 4  # further samples when no kept question leaves out the statement's names and numbers
    temperature: float = 0.8
    epochs: int = 2  # passes over the questions, one module update per question and pass
    answer_tokens: int = 32
    guard_weight: float = 1.0  # weight of the KL to the frozen model on guard prompts
    guard_tokens: int = 16  # length of the frozen replies the guard compares
    max_drift: float = 0.05  # undo when more than this share of the held-out guard replies change (12: none)
    lr: float = 0.0  # the module's learning rate during consolidation (0: its config's)
    steps: int = 2  # optimizer steps per update (0: its config's)
    guards_per_step: int = 2
    drift_tokens: int = 8  # reply tokens the drift check generates per held-out guard prompt
    seed: int = 0

    @classmethod
    def from_strings(cls, options: dict[str, str]) -> ConsolidationConfig:
        """From `key=value` strings (`--consolidate-opt`), each coerced to its field's type."""
        defaults = {f.name: f.default for f in fields(cls)}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(f"unknown consolidation option {unknown[0]!r} (known: {', '.join(sorted(defaults))})")
        return cls(**{key: coerce_option(raw, defaults[key], key) for key, raw in options.items()})

    def __post_init__(self) -> None:
        if self.questions < 1:
            raise ValueError(f"questions must be >= 1, got {self.questions}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.forward_tries < 0:
            raise ValueError(f"forward_tries must be >= 0, got {self.forward_tries}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.answer_tokens < 1 or self.guard_tokens < 1:
            raise ValueError("answer_tokens and guard_tokens must be >= 1")
        if not 1 <= self.drift_tokens <= self.guard_tokens:
            raise ValueError(f"drift_tokens must be in [1, guard_tokens={self.guard_tokens}], got {self.drift_tokens}")
        if self.guard_weight < 0:
            raise ValueError(f"guard_weight must be >= 0, got {self.guard_weight}")
        if not 0 <= self.max_drift <= 1:
            raise ValueError(f"max_drift must be in [0, 1], got {self.max_drift}")
        if self.lr < 0 or self.steps < 0:
            raise ValueError("lr and steps must be >= 0 (0: the module's own)")
        if not 0 <= self.guards_per_step <= GUARD_TRAIN:
            raise ValueError(f"guards_per_step must be in [0, {GUARD_TRAIN}], got {self.guards_per_step}")


@dataclass
class Example:
    """One chat the student learns: [system + user question] then the teacher's answer (targets)."""

    question: str
    answer: str
    ids: list[int]
    positions: list[int]  # output i of `ids` predicts targets[k] for positions[k] = i
    targets: list[int]


@dataclass
class Guard:
    """An unrelated prompt and the frozen model's reply: its log-distributions and greedy tokens."""

    prompt: str
    ids: list[int]
    positions: list[int]
    targets: list[int]  # the frozen greedy reply
    logprobs: Array  # [len(positions), vocab], frozen


@dataclass
class ConsolidationSummary:
    statement: str
    examples: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) learned
    dropped: list[tuple[str, str]] = field(default_factory=list)  # answers that did not use the statement
    loss: float | None = None  # mean CE of the answers before consolidating
    loss_after: float | None = None
    drift: float | None = None  # share of held-out guard replies the memory changes
    rolled_back: bool = False
    updates: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("loss", "loss_after", "drift", "seconds"):
            if out[key] is not None:
                out[key] = round(out[key], 4)
        return out


class Consolidator:
    """Consolidates statements into the gradient module of one backend (its frozen model teaches)."""

    def __init__(self, backend: Backend, config: ConsolidationConfig | None = None,
                 system: Sequence[Message] = ()) -> None:
        self.backend = backend
        self.config = config or ConsolidationConfig()
        self.system = list(system)
        self._turn = 0  # rotates the guard prompts across updates

    # --- what to consolidate --------------------------------------------------------------
    def statements(self, text: str, layer: int) -> list[str]:
        """The sentences of a user message that tell something (trace_bank's write gate decides)."""
        view = self.backend.view()
        return [s for s in sentences(text) if not is_question(s) and gate_score(view, layer, s) >= 0.0]

    # --- the teacher ---------------------------------------------------------------------------
    @cached_property
    def teacher(self) -> Teacher:
        cfg = self.config
        return Teacher(self.backend, TeacherConfig(questions=cfg.questions, forward_tries=cfg.forward_tries,
                                                   temperature=cfg.temperature, max_tokens=cfg.answer_tokens,
                                                   seed=cfg.seed))

    def examples(self, statement: str) -> tuple[list[Example], list[tuple[str, str]]]:
        """Questions the frozen model asks about `statement`, each with the answer it gives reading it;
        and the (question, answer) pairs dropped because the answer did not use the statement."""
        kept, dropped = self.teacher.pairs(statement)
        return [self.example(q, a) for q, a in kept], dropped

    @cached_property
    def _end_id(self) -> int:
        """The token that ends an assistant turn (the template's, found by rendering one)."""
        fmt = self.backend.formatter
        msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        tail = fmt.encode(fmt.render(msgs, add_generation_prompt=False))
        for tok in reversed(tail):
            if tok in fmt.stop_ids:
                return tok
        return min(fmt.stop_ids)

    # --- the guard -------------------------------------------------------------------------------
    def guards(self) -> list[Guard]:
        """Frozen replies to the guard prompts: computed once per loaded model and system prompt."""
        key = ("consolidation.guards", tuple(m["content"] for m in self.system), self.config.guard_tokens)
        return self.backend.view().memo(key, self._frozen_replies)

    def _frozen_replies(self) -> list[Guard]:
        """The replies are generated once per model and system prompt and kept on disk; the scores over
        the vocabulary (3 MB a prompt) are recomputed, one forward each."""
        fmt, ops, out = self.backend.formatter, self.backend.ops, []
        greedy = DecodingConfig(strategy="greedy", max_tokens=self.config.guard_tokens, repetition_penalty=1.0)
        prompts = [fmt.generation_ids([*self.system, {"role": "user", "content": p}]) for p in GUARD_PROMPTS]

        def generate() -> dict[str, np.ndarray]:
            with self.backend.frozen():
                return {str(i): np.asarray(list(self.backend.generate(ids, greedy)) or [self._end_id], dtype=np.int64)
                        for i, ids in enumerate(prompts)}

        texts = [m["content"] for m in self.system] + list(GUARD_PROMPTS)
        replies = self.backend.view().stored(f"consolidation.guards.1.{self.config.guard_tokens}.{digest(texts)}",
                                             generate)
        with self.backend.frozen():
            for i, ids in enumerate(prompts):
                reply = [int(t) for t in replies[str(i)]]
                full = ids + reply
                positions = list(range(len(ids) - 1, len(full) - 1))
                logits = self.backend.forward(full, self.backend.new_cache(), "score", keep=positions)
                out.append(Guard(GUARD_PROMPTS[i], full, positions, reply, ops.log_softmax(logits, -1)))
        return out

    def drift(self, module: GradientMemory) -> float:
        """Share of the held-out guard prompts whose greedy reply (its first `drift_tokens`), generated with
        the memory the way a chat generates, differs from the frozen model's. Generated, not scored: a
        module that routes by the prefix (chaptered_bank) reads other slots while generating than in one
        scoring pass, and a scored check missed changes that every reply showed. A prompt the module
        says it leaves exactly alone (`affects`) counts as unchanged without generating."""
        n = self.config.drift_tokens
        greedy = DecodingConfig(strategy="greedy", max_tokens=n, repetition_penalty=1.0)
        held_out = self.guards()[GUARD_TRAIN:]
        changed = 0
        self.backend.reset_session()  # what it holds was computed before the updates
        for g in held_out:  # consecutive prompts reuse the cached system prompt
            if not module.affects(g.prompt):
                continue  # the module leaves this reply exactly as it was
            module.before_reply([*self.system, {"role": "user", "content": g.prompt}])
            reply = list(self.backend.generate(g.ids[: len(g.ids) - len(g.targets)], greedy))
            changed += reply != g.targets[:n]
        self.backend.reset_session()
        return changed / max(len(held_out), 1)

    # --- the student -----------------------------------------------------------------------------
    def statement_example(self, statement: str, hook: MemoryHook) -> tuple[Example, Array | None] | None:
        """`statement` as the user's turn, with its surprising tokens as targets (the seeds' selection: CE
        above the statement's mean), and the states entering the module that the same scoring pass
        captured; None when no token is selected. Taken before the statement's fact is trained, so the
        CE is the model's as it was."""
        fmt, be, ops = self.backend.formatter, self.backend, self.backend.ops
        messages = [*self.system, {"role": "user", "content": statement}]
        turn = fmt.user_turn(messages, len(messages) - 1)
        ids, n = turn.prefix_ids + turn.turn_ids, len(turn.prefix_ids)
        content = [n + j for j, inside in enumerate(turn.content_mask) if inside and n + j > 0]
        if not content:
            return None
        hook.captured = None
        logits = be.forward(ids, be.new_cache(), "score", keep=[i - 1 for i in content])
        losses = ops.to_numpy(ops.cross_entropy(logits, ops.asarray([ids[i] for i in content], dtype="int32")))
        chosen = [content[k] for k in select_surprising(losses)]
        if not chosen:
            return None
        hidden = None if hook.captured is None else hook.captured[0]
        return Example(statement, "", ids, [i - 1 for i in chosen], [ids[i] for i in chosen]), hidden

    def _answer_loss(self, ex: Example, phase: Phase = "train", hidden: Array | None = None) -> Array:
        """The answer's cross-entropy; from `hidden`, the states leaving the module's layer that a scoring
        pass captured, only the layers above the module run where the backend can start there."""
        ops, be = self.backend.ops, self.backend
        logits = None if hidden is None else be.forward_after_hook(hidden, phase, keep=ex.positions)
        if logits is None:
            logits = be.forward(ex.ids, be.new_cache(), phase, keep=ex.positions)
        return ops.mean(ops.cross_entropy(logits, ops.asarray(ex.targets, dtype="int32")))

    def _guard_loss(self, g: Guard) -> Array:
        ops = self.backend.ops
        logits = self.backend.forward(g.ids, self.backend.new_cache(), "train", keep=g.positions)
        p = ops.exp(g.logprobs)
        return ops.mean(ops.sum(p * (g.logprobs - ops.log_softmax(logits, -1)), axis=-1))

    def _scored(self, hook: MemoryHook, examples: Sequence[Example],
                hiddens: Sequence[Array | None] = ()) -> tuple[float, list[Array | None]]:
        """The examples' mean answer loss, and each one's states [T, d] entering the module, which the
        same scoring pass captures (the frozen layers below the module make them); given `hiddens`, those
        states are where the pass starts."""
        ops, losses, out = self.backend.ops, [], []
        for ex, hidden in zip(examples, hiddens or [None] * len(examples), strict=True):
            hook.captured = None
            losses.append(float(ops.to_numpy(self._answer_loss(ex, "score", hidden))))
            out.append(hidden if hook.captured is None else hook.captured[0])
        return float(np.mean(losses)), out

    def consolidate(self, module: GradientMemory, hook: MemoryHook, statement: str,
                    restore: Callable[[], None] | None = None) -> ConsolidationSummary:
        """Teach `module` to answer the frozen model's questions about `statement` without it. `restore`
        puts the module back as it was, when the drift check fails."""
        start = time.perf_counter()
        examples, dropped = self.examples(statement)
        # A routed module may open slots of its own for the statement (none without a question to train).
        opening = (module.consolidating([e.question for e in examples], GUARD_PROMPTS[:GUARD_TRAIN],
                                         statement=statement)
                   if examples else nullcontext())
        with opening:
            summary = self.learn(module, hook, examples, statement=statement, restore=restore)
        summary.dropped = dropped
        summary.seconds = time.perf_counter() - start
        return summary

    def learn(self, module: GradientMemory, hook: MemoryHook, examples: Sequence[Example], *, statement: str = "",
              restore: Callable[[], None] | None = None) -> ConsolidationSummary:
        """The student's part: module updates on `examples` (answer CE + KL on guard prompts), then the
        drift check on the held-out guard prompts."""
        start = time.perf_counter()
        cfg = self.config
        summary = ConsolidationSummary(statement, examples=[(e.question, e.answer) for e in examples])
        if not examples:
            return summary
        guards = self.guards()[:GUARD_TRAIN]
        summary.loss, hiddens = self._scored(hook, examples)
        batches = [(ex, hidden, 1.0) for ex, hidden in zip(examples, hiddens, strict=True)]
        # The module's weight of the statement's own surprising tokens (fact-gate modules' option).
        own_weight = float(getattr(module.config, "fact_statement_weight", 0.0))
        own = self.statement_example(statement, hook) if own_weight > 0 and statement else None
        if own is not None:  # after the questions: a routed module's slots are the answers'
            batches.append((*own, own_weight))
        with module.schedule(cfg.lr or None, cfg.steps or None):
            for _ in range(cfg.epochs):
                for ex, hidden, weight in batches:
                    chosen = [guards[(self._turn + j) % len(guards)] for j in range(cfg.guards_per_step)]
                    chosen = [g for g in chosen if module.affects(g.prompt)]  # the rest stay as they are
                    self._turn += cfg.guards_per_step

                    def loss(params: Params, ex: Example = ex, chosen: list[Guard] = chosen,
                             hidden: Array | None = hidden, weight: float = weight) -> Array:
                        with module.bound(params):
                            total = weight * self._answer_loss(ex, hidden=hidden)
                            for g in chosen:
                                total = total + cfg.guard_weight / len(chosen) * self._guard_loss(g)
                        return total

                    module.learn(LearnBatch(input_ids=ex.ids, positions=ex.positions, target_ids=ex.targets,
                                            hidden=hidden, loss=loss))
                    summary.updates += 1
        summary.loss_after, _ = self._scored(hook, examples, hiddens)
        summary.drift = self.drift(module)
        if summary.drift > cfg.max_drift and restore is not None:
            restore()
            summary.rolled_back = True
        summary.seconds = time.perf_counter() - start
        return summary

    def example(self, question: str, answer: str) -> Example:
        """`question` asked in this chat's format, `answer` (then the end of the turn) as its targets."""
        fmt = self.backend.formatter
        prompt = fmt.generation_ids([*self.system, {"role": "user", "content": question}])
        reply = fmt.encode(answer) + [self._end_id]
        ids = prompt + reply[:-1]
        return Example(question, answer, ids, list(range(len(prompt) - 1, len(ids))), reply)


def log_consolidation(log: EventLog, summary: ConsolidationSummary, *, turn: int, backend: Backend,
                      module: GradientMemory, layer: int) -> None:
    log.write(ConsolidationRecord(
        turn=turn, backend=backend.name, model=backend.model_id, module=module.name, layer=layer,
        statement=summary.statement, examples=[list(e) for e in summary.examples],
        dropped=[list(e) for e in summary.dropped], loss=summary.loss, loss_after=summary.loss_after,
        drift=summary.drift, rolled_back=summary.rolled_back, updates=summary.updates,
        update_seconds=summary.seconds, time=time.time()))


def consolidate_message(consolidator: Consolidator, module: GradientMemory, hook: MemoryHook, log: EventLog,
                        messages: Sequence[Message], index: int, *, snapshot: Callable[[], Any],
                        restore: Callable[[Any], None]) -> UpdateSummary:
    """The learner of `--consolidate`: each statement of user message `index`, consolidated in turn
    (`snapshot`/`restore` let the drift check undo one statement without undoing the others)."""
    start = time.perf_counter()
    summary = UpdateSummary(turn=index, learner="consolidate")
    statements = consolidator.statements(messages[index]["content"], hook.layer)
    if not statements:
        summary.skipped = "no statement to consolidate"
    for statement in statements:
        before = snapshot()
        result = consolidator.consolidate(module, hook, statement, restore=lambda before=before: restore(before))
        log_consolidation(log, result, turn=index, backend=consolidator.backend, module=module, layer=hook.layer)
        summary.consolidated.append(result.to_json())
    consolidator.backend.reset_session()  # the session cache was computed by the old memory
    summary.note = "; ".join(_note(c) for c in summary.consolidated) or f"not consolidated ({summary.skipped})"
    summary.seconds = time.perf_counter() - start
    return summary


def _note(c: dict[str, Any]) -> str:
    head = f"consolidated {c['statement']!r}"
    if not c["examples"]:
        return f"{head}: no question the frozen model answered from it"
    loss = f"{c['loss']:.2f} -> {c['loss_after']:.2f}" if c["loss"] is not None else "-"
    if c["rolled_back"]:
        return f"{head}: undone, it changed {c['drift']:.0%} of unrelated replies' tokens (loss {loss})"
    return f"{head} ({len(c['examples'])} questions, loss {loss}, drift {c['drift']:.0%})"
