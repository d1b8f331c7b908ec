"""What every model backend provides, and the generation loop they share.

A backend owns one frozen model, its tokenizer and a session KV cache. It exposes a few
primitives (a forward pass on a cache, cache views and truncation, the layer hook) and
this base class builds the rest on them: prompt-prefix reuse, the system prompt's frozen state
(`frozen_prefix`, which `capture` and `token_logprobs` start from), the decode loop (its per-token
steps, from the repetition guard to sampling and the memory contrast, are `lmm.backends.decoding`),
rows of one prompt decoded in lockstep (`decode_rows`), prefix-conditioned scoring for memory updates,
and the `BackendView` (`lmm.backends.view`) a memory module is given. It holds no memory-module logic
(that is `lmm.memory`, which it never imports) and no UI.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lmm.backends.decoding import DecodingConfig, NgramBlocker, contrast_scores, penalize_repeats, sample_token
from lmm.backends.view import BackendView
from lmm.chat_format import ChatFormatter
from lmm.ops import Array, Ops
from lmm.types import Captured, ExtraKV, HookFn, Phase, RewriteContext

# Where decoder layers live, by attribute path, across the supported families.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.model.layers",
    "model.decoder.layers",
    "transformer.h",
    "layers",
)


class BackendError(RuntimeError):
    """The backend cannot run this model or request."""


def find_layers(model: Any, expected: int | None = None) -> tuple[str, Sequence[Any]]:
    """Return (path, layers) of the decoder layer list, found by attribute paths."""
    for path in LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is None or isinstance(obj, (str, bytes)):
            continue
        try:
            n = len(obj)
        except TypeError:
            continue
        if n and (expected is None or n == expected):
            return path, obj
    raise BackendError(f"cannot find the decoder layers of {type(model).__name__} (tried {', '.join(LAYER_PATHS)})")


def check_logprob_batch(batch: Sequence[Sequence[int]]) -> tuple[list[list[int]], int]:
    """`token_logprobs`' rows as lists and the length of the prefix they all share (0 when under two
    tokens; at least one token of each row left after it), or a BackendError naming what is wrong."""
    rows = [list(ids) for ids in batch]
    if not rows or min(len(r) for r in rows) < 2:
        raise BackendError("token_logprobs needs at least one sequence, each of at least two tokens")
    shared = min(min(common_prefix_len(rows[0], r) for r in rows), min(len(r) for r in rows) - 1)
    return rows, shared if shared >= 2 else 0


def join_logprobs(rows: Sequence[Sequence[int]], shared: int, head: np.ndarray | None,
                  tails: np.ndarray) -> list[np.ndarray]:
    """Per row, log P(ids[i] | ids[:i]) for i >= 1, from the shared prefix's log-softmax `head`
    [shared, vocab] (None when nothing is shared) and the rows' own picked log-probabilities `tails`
    [rows, width - 1] (their token i + 1 given tokens up to i, past the prefix)."""
    heads = [np.zeros(0) if head is None else head[np.arange(shared), row[1: shared + 1]] for row in rows]
    return [np.concatenate([h, tails[i, : len(row) - shared - 1]]).astype(np.float32)
            for i, (row, h) in enumerate(zip(rows, heads, strict=True))]


@dataclass
class FrozenPrefix:
    """The frozen model's state after the system prompt every standalone turn starts with, computed
    once per backend: its token ids, a cache holding its keys/values (copied by `cache_view`, never
    written), the hidden states entering every layer [P, d], and its log-softmax [P, vocab]."""

    ids: list[int]
    cache: Any
    hidden: dict[int, Any]
    logprobs: np.ndarray


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    generation_seconds: float = 0.0
    finish_reason: str = "length"

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


class RowDecoder(Protocol):
    """One row of `Backend.decode_rows`: it picks each token it feeds from its own scores."""

    def next_token(self, scores: np.ndarray) -> int | None:
        """The token to feed next, given the logits [vocab] after the row's last token; None: done."""


class Backend(ABC):
    """A loaded model with a hookable middle layer and a session KV cache."""

    name: str
    supports_beam: bool = False

    def __init__(self) -> None:
        self.model_id: str = ""
        self.model_path: Path | None = None  # the loaded folder (keys the on-disk cache of `stored`)
        self.precision = ""  # what else changes the model's numbers: device and dtype
        self.formatter: ChatFormatter
        self.ops: Ops
        self.hidden_size: int = 0
        self.num_layers: int = 0
        self.context_length: int = 0
        self.layer_path: str = ""
        self.hook_context = RewriteContext(phase="generate", offset=0)
        self._session_cache: Any = None
        self._session_tokens: list[int] = []
        self._plain_cache: tuple[Any, list[int]] | None = None  # the memory contrast's frozen stream (_PlainStream)
        self._rows_cache: tuple[Any, list[int]] | None = None  # the last prompt `decode_rows` ran (frozen)
        self.last_stats = GenerationStats()
        self.installed_hook: HookFn | None = None  # set by install_hook, cleared by remove_hook
        self._hook_layer = -1  # the layer `installed_hook` is on
        self.extra_kv: ExtraKV | None = None  # attention memory read by every forward (set_extra_kv)
        self._bypass_hook = False  # True during `capture`: the frozen model, no memory
        self._view: BackendView | None = None
        self._prefix: FrozenPrefix | None | bool = None  # None: not computed yet; False: none is kept

    # --- primitives each backend implements ----------------------------------------
    @abstractmethod
    def install_hook(self, layer: int, hook: HookFn) -> None: ...

    @abstractmethod
    def remove_hook(self) -> None: ...

    @abstractmethod
    def new_cache(self) -> Any: ...

    @abstractmethod
    def _forward(self, ids: Sequence[int], cache: Any, grad: bool, keep: Sequence[int] | None) -> Array:
        """Run `ids` on top of `cache` (extending it); return float32 logits [len(keep) or T, vocab].

        `keep` lists the positions whose logits are needed (None: all); the output head, the
        largest matmul of a small model, runs on those positions only."""

    @abstractmethod
    def cache_view(self, cache: Any, n: int) -> Any | None:
        """A cache holding the first `n` positions of `cache`, sharing storage, never mutating it;
        None where the cache type cannot be viewed (the caller recomputes)."""

    @abstractmethod
    def truncate_cache(self, cache: Any, n: int) -> bool:
        """Cut `cache` to its first `n` positions in place; False if this cache cannot be cut."""

    @abstractmethod
    def _repeat_rows(self, cache: Any, n: int) -> None:
        """Make a one-row `cache` (a view: never the session's) hold `n` identical rows."""

    @abstractmethod
    def _step_rows(self, tokens: Sequence[int], cache: Any) -> np.ndarray:
        """Feed one token per row of `cache` (all rows at the same position) to the frozen model;
        return float32 logits [rows, vocab]."""

    def beam_search(self, prompt_ids: list[int], decoding: DecodingConfig, stop_ids: set[int]) -> list[int]:
        raise BackendError(f"{self.name} has no beam search")

    def _forward_above(self, hidden: Array, hook: HookFn, grad: bool, keep: Sequence[int] | None) -> Array | None:
        """`hook` on `hidden` [1, T, d], then the layers above the hooked one: float32 logits [len(keep) or T,
        vocab]. None where this model cannot be started there (the default)."""
        return None

    def prepare_thread(self) -> None:
        """Run once on every thread, other than the loading one, that will use this backend (the
        engine's update thread). The default needs nothing."""

    def release_thread(self) -> None:
        """Run last on a thread that used this backend, before the thread or the process ends.
        The default needs nothing."""

    def close(self) -> None:
        """Release the model's resources for this process's exit; the backend is not used after."""
        self.remove_hook()
        self.reset_session()
        self._rows_cache = None
        self.release_thread()

    def capture(self, ids: Sequence[int], *, hidden_layers: Sequence[int] = (),
                kv_layers: Sequence[int] = (), shift: int = 0) -> Captured:
        """Run the frozen model (memory hook bypassed, no extra keys/values) on `ids` from an empty
        cache; return the hidden states entering each of `hidden_layers` and the keys/values of
        `kv_layers`, all from one forward. Stops after the deepest hidden layer when no keys/values
        are asked for. `shift`: the keys are rotated as if every token sat `shift` positions later
        (negative: earlier); RoPE attention depends on relative positions only, so nothing else
        changes."""
        raise BackendError(f"{self.name} cannot capture layer states")

    def token_logprobs(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per sequence `ids` of `batch`: log P(ids[i] | ids[:i]) for i >= 1 under the frozen model (no
        memory hook, no extra keys/values), all in one batched forward after the prefix the rows share
        (a system prompt), which runs once: float32 [len(ids) - 1] each."""
        raise BackendError(f"{self.name} cannot score tokens")

    # --- attention memory ----------------------------------------------------------
    def set_extra_kv(self, extra: ExtraKV | None) -> None:
        """Prepend `extra` keys/values to the attention of its layers in every following forward
        (None: the plain path). A change of content drops the session cache."""
        old = self.extra_kv
        if (old is None) != (extra is None) or (old is not None and extra is not None and old.key != extra.key):
            self.reset_session()
        self.extra_kv = extra

    def _memory_detached(self) -> None:
        """Called by install_hook/remove_hook: nothing of the previous module may stay active."""
        self.installed_hook = None
        self.set_extra_kv(None)

    def view(self) -> BackendView:
        """The narrow view of this model that memory modules get (one per backend)."""
        if self._view is None:
            self._view = BackendView(self)
        return self._view

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Forwards and generation inside run the plain model: the hook is bypassed and no extra
        keys/values are read. The session cache is dropped on the way in and out (it holds states
        computed with the memory, or would hold states computed without it)."""
        self.reset_session()
        try:
            with self.plain_model():
                yield
        finally:
            self.reset_session()

    @contextmanager
    def plain_model(self) -> Iterator[None]:
        """Forwards inside run the frozen model (hook bypassed, no extra keys/values); caches untouched."""
        extra, bypass = self.extra_kv, self._bypass_hook
        self.extra_kv, self._bypass_hook = None, True
        try:
            yield
        finally:
            self.extra_kv, self._bypass_hook = extra, bypass

    # --- built on the primitives ---------------------------------------------------
    def forward(self, ids: Sequence[int], cache: Any, phase: Phase, keep: Sequence[int] | None = None) -> Array:
        offset = self.cache_length(cache)
        self.hook_context = RewriteContext(phase=phase, offset=offset)
        try:
            return self._forward(ids, cache, grad=phase == "train", keep=keep)
        finally:
            self.hook_context = RewriteContext(phase="generate", offset=0)

    def forward_after_hook(self, hidden: Array, phase: Phase, keep: Sequence[int] | None = None) -> Array | None:
        """The logits [len(keep) or T, vocab] of a sequence from position 0 whose states leaving the hooked
        layer, before the hook, are `hidden` [T, d]: the hook, then only the layers above it run (no extra
        keys/values). None where a backend cannot start there; the caller then runs `forward`. Why: a
        module's training forwards recompute the frozen layers below it, half the model, for nothing."""
        hook = self.installed_hook
        if hook is None or self.extra_kv is not None:
            return None
        self.hook_context = RewriteContext(phase=phase, offset=0)

        def apply(h: Array) -> Array:
            return h if self._bypass_hook else hook(h, self.hook_context)

        try:
            return self._forward_above(hidden[None], apply, grad=phase == "train", keep=keep)
        finally:
            self.hook_context = RewriteContext(phase="generate", offset=0)

    @abstractmethod
    def cache_length(self, cache: Any) -> int: ...

    def frozen_prefix(self, ids: Sequence[int]) -> FrozenPrefix | None:
        """The system prompt's frozen state when `ids` start with it and go past it (else None).
        `capture` and `token_logprobs` start from it: every standalone turn a memory module encodes
        repeats those tokens, and skipping them took a quarter off a message's encoding (measured)."""
        if self._prefix is None:
            turn = self.formatter.standalone_turn("Hello.")
            self._prefix = self._compute_prefix(turn.ids[: turn.start]) if turn.start > 1 else False
        p = self._prefix
        return p if isinstance(p, FrozenPrefix) and len(ids) > len(p.ids) and list(ids[: len(p.ids)]) == p.ids else None

    def _compute_prefix(self, ids: list[int]) -> FrozenPrefix | bool:
        return False  # one frozen forward of `ids` from an empty cache; False: none is kept

    def _start(self, ids: Sequence[int], shift: int = 0) -> tuple[Any, FrozenPrefix | None]:
        """A copy of the system prompt's cache to run `ids` on, or an empty one (always for a `shift`)."""
        prefix = self.frozen_prefix(ids) if shift == 0 else None
        view = None if prefix is None else self.cache_view(prefix.cache, len(prefix.ids))
        return (self.new_cache(), None) if view is None else (view, prefix)

    def reset_session(self) -> None:
        """Drop the session KV cache (the chat history changed or the module was replaced)."""
        self._session_cache, self._session_tokens = None, []

    def keep_session_prefix(self, n: int) -> None:
        """Keep only the first `n` cached positions, e.g. after the memory changed what follows."""
        if self._session_cache is None or n >= len(self._session_tokens):
            return
        if n > 0 and self.truncate_cache(self._session_cache, n):
            self._session_tokens = self._session_tokens[:n]
        else:
            self.reset_session()

    def _reusable(self, cache: Any, tokens: Sequence[int], ids: Sequence[int]) -> int:
        """How many leading positions of `cache` (which holds `tokens`) a forward of `ids` can reuse,
        the cache cut back to them; 0: none (at least one token of `ids` is always left to run)."""
        k = min(common_prefix_len(tokens, ids), len(ids) - 1)
        return k if k > 0 and (k == len(tokens) or self.truncate_cache(cache, k)) else 0

    def _session_for(self, ids: Sequence[int]) -> tuple[Any, int]:
        """A session cache covering a prefix of `ids`, and how many positions it reuses."""
        if self._session_cache is not None:
            k = self._reusable(self._session_cache, self._session_tokens, ids)
            if k:
                self._session_tokens = list(self._session_tokens[:k])
                return self._session_cache, k
        self._session_cache, self._session_tokens = self.new_cache(), []
        return self._session_cache, 0

    def generate(
        self,
        prompt_ids: list[int],
        decoding: DecodingConfig,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[int]:
        """Yield generated token ids, stop token excluded. Keeps the session cache for the next turn."""
        strategy = decoding.resolved(self.supports_beam)
        stop_ids = self.formatter.stop_ids
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        if strategy == "beam":
            self.reset_session()
            for i, tok in enumerate(self.beam_search(prompt_ids, decoding, stop_ids)):
                if i == 0:
                    stats.time_to_first_token = time.perf_counter() - start
                stats.generated_tokens += 1
                yield tok
            stats.generation_seconds = time.perf_counter() - start
            stats.finish_reason = "stop"
            return
        rng = np.random.default_rng(decoding.seed)
        cache, reused = self._session_for(prompt_ids)
        stats.reused_tokens = reused
        self._session_tokens = list(prompt_ids)  # what the cache will hold after the prefill
        new = prompt_ids[reused:]
        logits = self.forward(new, cache, "generate", keep=[len(new) - 1])
        contrast = decoding.memory_contrast if self.extra_kv is not None else 0.0
        plain = _PlainStream(self, prompt_ids) if contrast else None
        first_token_time = None
        reply: list[int] = []
        ngrams = NgramBlocker(decoding.no_repeat_ngram)
        for _ in range(decoding.max_tokens):
            scores = self.ops.to_numpy(logits[-1])
            if plain is not None:
                scores = contrast_scores(scores, plain.scores, contrast, decoding.contrast_floor)
            if decoding.repeat_last_n:
                scores = penalize_repeats(scores, reply[-decoding.repeat_last_n:], decoding.repetition_penalty)
            scores = ngrams.block(scores, reply)
            tok = sample_token(scores, strategy, decoding.temperature, decoding.top_p, rng)
            if first_token_time is None:
                first_token_time = time.perf_counter()
                stats.time_to_first_token = first_token_time - start
            if tok in stop_ids:
                stats.finish_reason = "stop"
                break
            stats.generated_tokens += 1
            reply.append(tok)
            ngrams.add(reply)
            yield tok
            if should_stop():
                stats.finish_reason = "interrupted"
                break
            logits = self.forward([tok], cache, "generate")
            self._session_tokens.append(tok)
            if plain is not None:
                plain.step(tok)
        stats.generation_seconds = time.perf_counter() - (first_token_time or start)

    def decode_rows(self, prompt_ids: list[int], rows: Sequence[RowDecoder], max_steps: int) -> None:
        """Continue `prompt_ids` along every row in lockstep under the frozen model (hook bypassed, no
        extra keys/values): the prompt runs once, its keys/values are copied per row, and each step feeds
        one token per row as a single batch. A row that is done feeds its last token again and its scores
        are ignored. Why: on a CPU a small model's step costs about the same for a few rows as for one (the
        weights' reads dominate). The prompt's frozen cache is kept for the next call to reuse."""
        if not rows or not prompt_ids:
            return
        kept, self._rows_cache = self._rows_cache, None
        done = 0 if kept is None else self._reusable(kept[0], kept[1], prompt_ids)
        if done:
            cache = kept[0]
        else:  # from the system prompt's frozen state when the prompt starts with it
            cache, prefix = self._start(prompt_ids)
            done = 0 if prefix is None else len(prefix.ids)
        with self.plain_model():
            new = prompt_ids[done:]
            first = self.ops.to_numpy(self.forward(new, cache, "score", keep=[len(new) - 1])[-1])
            self._rows_cache = (cache, list(prompt_ids))
            batch = self.cache_view(cache, len(prompt_ids))
            if batch is None:  # a cache that cannot be viewed (sliding windows) is used once, not kept
                self._rows_cache, batch = None, cache
            self._repeat_rows(batch, len(rows))
            scores = np.repeat(first[None], len(rows), axis=0)
            last = [0] * len(rows)
            finished = [False] * len(rows)
            for _ in range(max_steps):
                for i, row in enumerate(rows):
                    if not finished[i]:
                        tok = row.next_token(scores[i])
                        finished[i] = tok is None
                        last[i] = last[i] if tok is None else tok
                if all(finished):
                    return
                scores = self._step_rows(last, batch)

    def forward_on_prefix(self, prefix_ids: Sequence[int], ids: Sequence[int], phase: Phase,
                          keep: Sequence[int] | None = None) -> Array:
        """Logits of `ids` (at positions `keep`) conditioned on `prefix_ids`, reusing the session
        cache without changing it."""
        view = None
        n = len(prefix_ids)
        if n == 0:
            view = self.new_cache()
        elif (self._session_cache is not None and len(self._session_tokens) >= n
              and self._session_tokens[:n] == list(prefix_ids)):
            view = self.cache_view(self._session_cache, n)
        if view is None:
            # Rebuild the prefix once and keep it as the session cache for the following steps.
            cache = self.new_cache()
            self.forward(prefix_ids, cache, "score", keep=[n - 1])
            self._session_cache, self._session_tokens = cache, list(prefix_ids)
            view = self.cache_view(cache, n)
            if view is None:
                view = self.new_cache()
                self.forward(prefix_ids, view, "score", keep=[n - 1])
        return self.forward(ids, view, phase, keep=keep)


class _PlainStream:
    """The same reply decoded by the frozen model, without the memory (the memory contrast's other
    side), on its own cache. Frozen states never go stale, so that cache is kept on the backend for
    the next reply to reuse (the chat so far), or started from the system prompt's frozen state."""

    def __init__(self, backend: Backend, prompt_ids: Sequence[int]) -> None:
        self.backend = backend
        kept, backend._plain_cache = backend._plain_cache, None
        done = 0 if kept is None else backend._reusable(kept[0], kept[1], prompt_ids)
        if done:
            self.cache = kept[0]
        else:
            self.cache, prefix = backend._start(prompt_ids)
            done = 0 if prefix is None else len(prefix.ids)
        self.scores = self._forward(list(prompt_ids[done:]))
        # what the cache holds; kept only while it matches (a forward that fails drops it)
        self.tokens = list(prompt_ids)
        backend._plain_cache = (self.cache, self.tokens)

    def _forward(self, ids: list[int]) -> np.ndarray:
        b = self.backend
        with b.plain_model():
            return b.ops.to_numpy(b.forward(ids, self.cache, "generate", keep=[len(ids) - 1])[-1])

    def step(self, tok: int) -> None:
        kept, self.backend._plain_cache = self.backend._plain_cache, None
        self.scores = self._forward([tok])
        self.tokens.append(tok)
        self.backend._plain_cache = kept
