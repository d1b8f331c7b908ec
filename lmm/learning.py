"""The two learners: what runs after each user message, for each kind of memory module.

Owns one update from start to record. `learn_from_surprise` (modules of kind "surprise"):
the CE of the message's content tokens conditioned on the whole chat before it (reusing the
session KV prefix), the above-the-mean selection, the `LearnBatch` handed to the module, the
loss after the update. `write_directly` (kind "direct"): the module writes the message into
memory itself and says what it stored. Both write `pre_hooks` / `post_hooks` records.
`LEARNERS` maps a module kind to its learner. It does not schedule updates (the engine does)
or define how a module learns (the module does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lmm.backends.base import Backend
from lmm.chat_format import Message
from lmm.events import EventLog, UpdateRecord, loss_by_decoded_token
from lmm.hook import MemoryHook
from lmm.memory.base import DirectMemory, LearnBatch, MemoryModule, select_surprising
from lmm.ops import Params


@dataclass
class UpdateSummary:
    """What one update did, for the stats line, `--json` output and benchmarks."""

    turn: int
    learner: Literal["surprise", "direct", "consolidate"] = "surprise"
    loss: float | None = None
    loss_after: float | None = None
    selected_tokens: list[str] = field(default_factory=list)
    token_losses: list[tuple[str, float, bool]] = field(default_factory=list)  # (token, CE, learned)
    stored: list[str] = field(default_factory=list)  # direct: the statements written
    note: str | None = None  # direct, consolidate: one line on what was stored or learned, or why nothing was
    dropped: list[str] = field(default_factory=list)  # direct: what the memory let go to make room
    seconds: float = 0.0
    skipped: str | None = None
    rolled_back: str | None = None  # the tensor that was not finite after the update, which was undone
    autosave_seconds: float | None = None  # finiteness check + crash-safe autosave, when autosaving
    consolidated: list[dict] = field(default_factory=list)  # consolidate: per statement, what was learned

    def to_json(self) -> dict:
        out: dict = {"learner": self.learner}
        if self.learner == "surprise":
            out.update(loss=self.loss, loss_after=self.loss_after, selected_tokens=self.selected_tokens,
                       n_selected=len(self.selected_tokens))
        elif self.learner == "consolidate":
            out.update(note=self.note, consolidated=self.consolidated)
        else:
            out.update(stored=self.stored, note=self.note, dropped=self.dropped)
        out.update(seconds=round(self.seconds, 4), skipped=self.skipped, rolled_back=self.rolled_back,
                   autosave_seconds=None if self.autosave_seconds is None else round(self.autosave_seconds, 4))
        return out


def _base(backend: Backend, module: MemoryModule, hook: MemoryHook, messages: Sequence[Message],
          index: int) -> dict:
    return dict(turn=index, backend=backend.name, model=backend.model_id, module=module.name,
                layer=hook.layer, user_text=messages[index]["content"], learner=module.kind)


def learn_from_surprise(
    backend: Backend, module: MemoryModule, hook: MemoryHook, log: EventLog,
    messages: Sequence[Message], index: int,
) -> UpdateSummary:
    start = time.perf_counter()
    fmt, ops = backend.formatter, backend.ops
    base = _base(backend, module, hook, messages, index)
    log.write(UpdateRecord(stage="pre_hooks", time=time.time(), **base))

    turn = fmt.user_turn(messages, index)
    n_prefix = len(turn.prefix_ids)
    # Feed the last prefix token too, so that the first turn token has a prediction.
    context = turn.prefix_ids[:-1]
    feed = turn.prefix_ids[-1:] + turn.turn_ids
    first = 0 if n_prefix else 1  # with no prefix the first token has nothing to predict it
    targets = turn.turn_ids[first:]
    mask = turn.content_mask[first:]
    positions = list(range(len(targets)))  # output j of `feed` predicts targets[j]

    logits = backend.forward_on_prefix(context, feed, "score", keep=positions)
    hidden = hook.captured[0] if hook.captured is not None else None
    raw = np.zeros(0, dtype=np.float32)
    if targets:
        raw = ops.to_numpy(ops.cross_entropy(logits[: len(targets)], ops.asarray(targets, dtype="int32")))
    content_idx = [i for i, m in enumerate(mask) if m]
    content_losses = raw[content_idx] if content_idx else np.zeros(0, dtype=np.float32)
    chosen = [content_idx[i] for i in select_surprising(content_losses)]
    tokens = fmt.token_texts(targets)
    selected_ids = [targets[i] for i in chosen]
    summary = UpdateSummary(
        turn=index, selected_tokens=[tokens[i] for i in chosen],
        token_losses=[(tokens[i], float(raw[i]), i in chosen) for i in content_idx],
    )
    record = UpdateRecord(
        stage="post_hooks", time=0.0, **base,
        user_response_target_token_ids=[targets[i] for i in content_idx],
        user_response_token_losses=[float(x) for x in content_losses],
        user_response_token_loss_by_decoded_token=loss_by_decoded_token(
            [tokens[i] for i in content_idx], [float(x) for x in content_losses]),
        user_response_raw_target_token_ids=list(targets),
        user_response_raw_token_losses=[float(x) for x in raw],
        selected_token_ids=selected_ids, selected_tokens=summary.selected_tokens,
    )
    if not chosen:
        summary.skipped = record.skipped = "no token above the message's mean CE"
    else:
        sel_pos = [positions[i] for i in chosen]
        sel_tgt = ops.asarray(selected_ids, dtype="int32")

        def loss_fn(params: Params):
            with module.bound(params):
                out = backend.forward_on_prefix(context, feed, "train", keep=sel_pos)
            return ops.mean(ops.cross_entropy(out, sel_tgt))

        batch = LearnBatch(input_ids=feed, positions=sel_pos, target_ids=selected_ids, hidden=hidden,
                           loss=loss_fn, token_losses=[float(raw[i]) for i in chosen],
                           messages=list(messages[: index + 1]), index=index)
        result = module.learn(batch)
        summary.loss = record.loss = float(np.mean([raw[i] for i in chosen]))
        after = backend.forward_on_prefix(context, feed, "score", keep=sel_pos)
        summary.loss_after = record.loss_after = float(ops.to_numpy(ops.mean(ops.cross_entropy(after, sel_tgt))))
        record.step_losses, record.grad_norms = result.losses, result.grad_norms
        # What follows this message in the session cache was computed by the old memory.
        backend.keep_session_prefix(n_prefix)
    summary.seconds = record.update_seconds = time.perf_counter() - start
    record.time = time.time()
    log.write(record)
    return summary


def write_directly(
    backend: Backend, module: MemoryModule, hook: MemoryHook, log: EventLog,
    messages: Sequence[Message], index: int,
) -> UpdateSummary:
    if not isinstance(module, DirectMemory):
        raise TypeError(f"{module.name} is not a DirectMemory")
    start = time.perf_counter()
    base = _base(backend, module, hook, messages, index)
    log.write(UpdateRecord(stage="pre_hooks", time=time.time(), **base))
    result = module.write(list(messages[: index + 1]), index)
    module.update_count += 1
    summary = UpdateSummary(turn=index, learner="direct", stored=result.stored, note=result.note,
                            dropped=result.dropped)
    summary.seconds = time.perf_counter() - start
    log.write(UpdateRecord(stage="post_hooks", time=time.time(), **base, stored=result.stored, note=result.note,
                           update_seconds=summary.seconds))
    return summary


Learner = Callable[[Backend, MemoryModule, MemoryHook, EventLog, Sequence[Message], int], UpdateSummary]
LEARNERS: dict[str, Learner] = {"surprise": learn_from_surprise, "direct": write_directly}
