"""`trace_bank`'s routing: which stored statements a user message reads.

Owns encoding a text as the only user turn of a chat (routing states of its content tokens, its
whole-turn mean state), the neutral calibration that centres and weights them, and the two stages
that decide what a reply reads. First stage, over every current trace: the whole-turn cosine (one
matrix product) and, for the `shortlist` best of it, token-level late interaction (each query
token's best cosine, weighted by how specific the token is), ranked by the margin past the nearer
threshold. Second stage, over the best `candidates` whose margin reaches `check_margin` (none: no
forward at all, the common case for a message about nothing stored), in one batched forward: the
frozen model's own judgement, the mean gain in log-probability of the message's tokens when the
statement precedes them (pointwise mutual information), plus `margin_weight` times the first-stage
margin; a trace past `relevance` is read (with `cover_surprisal` set, only if it leaves no token of
the message unexplained: still surprising after it and made little likelier by it), and of two read
statements about the message's subject, only the newer (a correction); with `read_neighbours` set, a
read statement brings the statements stored next to it from the same message. A mixin of `TraceBank`,
which owns the store, writing and reading; it holds no state of its own beyond caches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from lmm.memory.trace_gate import GATE_VERSION, Probe, digest, gate_probe, sentences
from lmm.memory.traces import CALIBRATION, Lru, Trace, late_interaction, normalize
from lmm.ops import Array, Ops
from lmm.types import Captured, ModelView

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from lmm.memory.trace_store import TraceStore


class Support(NamedTuple):
    """What the frozen model says of a statement as context for a message (`TraceRouting.relevance`)."""

    gain: float  # mean log-probability gain of the message's tokens after the statement
    uncovered: float  # the most surprising message token (nats) the statement does not explain


class TraceRouting:
    """Encoding and the two routing stages, for `TraceBank` (which sets the attributes below)."""

    cfg: Any  # TraceBankConfig
    ops: Ops
    model: ModelView | None
    traces: TraceStore
    center: np.ndarray | None
    routing: int
    sentence_layer: int
    _keys: Lru[int, np.ndarray]
    _queries: Lru[str, tuple[np.ndarray, np.ndarray]]
    _logprobs: Lru[str, np.ndarray]
    _generic: np.ndarray | None
    _sentence_center: np.ndarray | None
    _sentences: np.ndarray | None
    _sentence_rows: int
    hidden_size: int

    def _text(self, trace: Trace) -> str:
        raise NotImplementedError

    # --- encoding ----------------------------------------------------------------------------------
    @property
    def _model(self) -> ModelView:
        if self.model is None:
            raise RuntimeError("trace_bank is not attached to a model (ChatEngine attaches it)")
        return self.model

    def _turn(self, text: str) -> tuple[list[int], int, list[int]]:
        """Token ids of [system prompt + user turn(text)], the turn's first position, its content positions."""
        turn = self._model.encode_turn(text)
        return turn.ids, turn.start, turn.content

    def _route_states(self, hidden: Array, content: list[int]) -> np.ndarray:
        states = self.ops.to_numpy(hidden).astype(np.float32)
        return states[content] if content else states[-1:]

    def _encode(self, ids: list[int], start: int, content: list[int],
                kv_layers: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, Captured]:
        """One frozen forward of a turn: its routing states (content tokens entering `routing`), its
        sentence state (mean of the turn entering `sentence_layer`), and the capture itself."""
        cap = self._model.capture(ids, hidden_layers=(self.routing, self.sentence_layer), kv_layers=kv_layers)
        route = self._route_states(cap.hidden[self.routing], content)
        sentence = self.ops.to_numpy(cap.hidden[self.sentence_layer]).astype(np.float32)[start:].mean(axis=0)
        return route, sentence, cap

    def _content_mean(self, cap: Captured, content: list[int]) -> np.ndarray:
        """The write gate's feature: the content tokens' mean state entering `sentence_layer`."""
        states = self.ops.to_numpy(cap.hidden[self.sentence_layer]).astype(np.float32)
        return states[content].mean(axis=0) if content else states[-1]

    def _probe(self) -> Probe:
        """The write gate, fitted once per loaded model on the labelled examples' states."""
        return gate_probe(self._model, self.sentence_layer)

    def _calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """Routing states (all content tokens) and sentence states of the neutral CALIBRATION
        messages. They depend on the frozen model only, so they are computed once per backend and
        layer pair, not per module (a fresh engine routes at once)."""
        def compute() -> dict[str, np.ndarray]:
            encoded = [self._encode(*self._turn(text))[:2] for text in CALIBRATION]
            return {"route": np.concatenate([r for r, _ in encoded]), "sentence": np.stack([s for _, s in encoded])}

        key = (f"trace_bank.calibration.{GATE_VERSION}.layers{self.routing}-{self.sentence_layer}."
               f"{digest(CALIBRATION)}")
        stored = self._model.stored(key, compute)
        return stored["route"], stored["sentence"]

    def _ensure_center(self) -> np.ndarray:
        if self.center is None:
            self.center = self._calibration()[0].mean(axis=0).astype(np.float32)
        return self.center

    def _ensure_sentence_center(self) -> np.ndarray:
        if self._sentence_center is None:
            self._sentence_center = self._calibration()[1].mean(axis=0)
        return self._sentence_center

    def _token_weights(self, query: np.ndarray) -> np.ndarray:
        """How specific each (normalised, centred) query token is: 1 - its best cosine to any token
        of the generic calibration messages, so "what is my" weighs little and "brother" much."""
        if self._generic is None:
            self._generic = normalize(self._calibration()[0] - self._ensure_center())
        return np.clip(1.0 - (query @ self._generic.T).max(axis=1), 0.0, None)

    def _query_states(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(normalised centred routing states of the content tokens, normalised centred sentence state)."""
        cached = self._queries.get(text)
        if cached is None:
            ids, start, content = self._turn(text)
            cached = self._remember_query(text, *self._encode(ids, start, content)[:2])
        return cached

    def _remember_query(self, text: str, route: np.ndarray, sentence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._queries.put(text, (normalize(route - self._ensure_center()),
                                        normalize(sentence - self._ensure_sentence_center())))

    def _sentence_index(self) -> np.ndarray:
        """Normalised centred whole-turn states of every trace, row i for `traces[i]`. Traces appended
        since it was built are added in place (a write does not rebuild it: 70 ms at 10,000 traces);
        anything else that moves traces drops it (`_traces_changed`)."""
        n = len(self.traces)
        if self._sentence_rows > n:  # traces went without `_traces_changed`: rebuild, never misalign
            self._sentences = None
        built = 0 if self._sentences is None else self._sentence_rows
        if self._sentences is None or n > len(self._sentences):
            grown = np.zeros((max(16, 2 * n), self.hidden_size), dtype=np.float32)
            if self._sentences is not None:
                grown[:built] = self._sentences[:built]
            self._sentences = grown
        if built < n:
            stacked = self.traces.sentence_states(built, n)
            self._sentences[built:n] = normalize(stacked - self._ensure_sentence_center())
            self._sentence_rows = n
        return self._sentences[:n]

    def _trace_keys(self, i: int) -> np.ndarray:
        """Trace `i`'s routing states, centred and normalised (cached for the recently scored)."""
        uid = int(self.traces.uid[i])
        keys = self._keys.get(uid)
        if keys is None:
            keys = self._keys.put(uid, self._keys_of(self.traces[i]))
        return keys

    def _keys_of(self, trace: Trace) -> np.ndarray:
        """`trace`'s routing states as stored, centred and normalised (what the first stage compares)."""
        return normalize(trace.centred_route(self._ensure_center()))

    def _score_states(self, query: np.ndarray, sentence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token-level, whole-turn) scores of every trace. The token level, the costly one, is computed
        for the `shortlist` traces of best whole-turn cosine; the others score -inf there."""
        whole = self._sentence_index() @ sentence
        short = np.arange(len(whole))
        if len(short) > self.cfg.shortlist:
            short = np.argpartition(-whole, self.cfg.shortlist - 1)[: self.cfg.shortlist]
        keys = [self._trace_keys(int(i)) for i in short]
        starts = np.cumsum([0] + [len(k) for k in keys[:-1]])
        tokens = np.full(len(whole), -np.inf, dtype=np.float32)
        tokens[short] = late_interaction(query, np.concatenate(keys), starts, self._token_weights(query))
        return tokens, whole

    def scores(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Routing scores of every stored trace for a user message `text`: (token-level, sentence-level),
        each the best over the whole message and its sentences (a question inside a longer message
        routes as it would alone). Superseded traces score -inf: they are never read."""
        if not self.traces:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        parts = sentences(text)
        tokens, whole = [], []
        for part in [text, *parts[: self.cfg.max_query_sentences]] if len(parts) > 1 else [text]:
            t, s = self._score_states(*self._query_states(part))
            tokens.append(t)
            whole.append(s)
        stale = ~self.traces.current
        return np.where(stale, -np.inf, np.max(tokens, axis=0)), np.where(stale, -np.inf, np.max(whole, axis=0))

    def margins(self, text: str) -> np.ndarray:
        """How far each trace is past the nearer of its two thresholds for `text` (>= 0: routed)."""
        tokens, whole = self.scores(text)
        return np.maximum(tokens - self.cfg.threshold, whole - self.cfg.sentence_threshold)

    # --- second stage ---------------------------------------------------------------------------------
    def select(self, text: str, context: Sequence[str] = ()) -> list[int]:
        """Indices of the traces a reply to `text` reads, oldest first (see `route`)."""
        return self.route(text, context)[0]

    def route(self, text: str, context: Sequence[str] = ()) -> tuple[list[int], dict[str, float]]:
        """The traces a reply to `text` reads, oldest first, and each candidate's relevance. First stage:
        every current trace ranked by its routing margin; second stage: the best `candidates` (those past
        `check_margin`) checked by the frozen model (`relevance`, plus `margin_weight` times the margin,
        and, when `cover_surprisal` is set, no message token left unexplained past it); read: the most
        relevant past the `relevance` threshold, and the next within `read_spread` of it, at most
        `max_read` and `read_budget` tokens, with their neighbours from the same message in what the
        budget leaves. A statement found in `context` (`TraceBank` passes the user's earlier messages in
        the prompt when the message asks nothing) is not a candidate."""
        if not text or not self.traces:
            return [], {}
        margin = self.margins(text)
        said = [_squash(m) for m in context if m.strip()]

        def in_context(i: int) -> bool:  # its text inside an earlier message (decoded for the few asked about)
            text = _squash(self._text(self.traces[i])) if said else ""
            return bool(text) and any(text in m for m in said)

        first: list[int] = []
        for i in np.argsort(-margin, kind="stable"):
            if len(first) == self.cfg.candidates or not margin[i] >= self.cfg.check_margin:  # -inf: stale
                break
            if not in_context(int(i)):
                first.append(int(i))
        support = dict(zip(first, self.relevance([self.traces[i] for i in first], text), strict=True))
        gains = {i: support[i].gain + self.cfg.margin_weight * float(margin[i]) for i in first}
        relevant = sorted((i for i in first if gains[i] >= self.cfg.relevance
                           and not 0 < self.cfg.cover_surprisal < support[i].uncovered), key=lambda i: -gains[i])
        order = self._corrected(relevant, gains)
        chosen: list[int] = []
        budget = self.cfg.read_budget
        for i in order[: self.cfg.max_read]:
            n = int(self.traces.token_counts[i])
            if chosen and (gains[i] < gains[order[0]] - self.cfg.read_spread or n > budget):
                break
            chosen.append(i)
            budget -= n
        chosen = self._with_neighbours(chosen, budget, in_context)
        return (sorted(chosen, key=lambda i: int(self.traces.written[i])),
                {self._text(self.traces[i]): round(gains[i], 3) for i in first})

    def _with_neighbours(self, chosen: list[int], budget: int,
                         skip: Callable[[int], bool] = lambda i: False) -> list[int]:
        """`chosen` and, for each, the current statements stored from the same message (same `said_at`)
        up to `read_neighbours` on each side, nearest first, while `budget` tokens last. A sentence of a
        long turn often needs the one next to it ("It has an almond flour crust, ..." after "I made a
        chocolate raspberry tart."); docs/trace_bank.md, "Neighbours"."""
        k = self.cfg.read_neighbours
        if not k or not chosen:
            return chosen
        said, written, current = self.traces.said_at, self.traces.written, self.traces.current
        out = list(chosen)
        for i in chosen:
            if np.isnan(said[i]):  # files older than `said_at`: the message is not known
                continue
            same = np.flatnonzero((said == said[i]) & current)
            same = same[np.argsort(written[same], kind="stable")]
            hits = np.flatnonzero(same == i)
            if not len(hits):
                continue
            at = int(hits[0])
            for d in range(1, k + 1):
                for p in (at - d, at + d):
                    if 0 <= p < len(same) and int(same[p]) not in out and not skip(int(same[p])):
                        n = int(self.traces.token_counts[same[p]])
                        if n <= budget:
                            out.append(int(same[p]))
                            budget -= n
        return out

    def _corrected(self, order: list[int], gains: dict[int, float]) -> list[int]:
        """`order` without the statements a newer one in it corrects: said in another message, as
        relevant to this message (within `supersede_gap`), and scoring against the older, as a query,
        past `supersede` (token level) and `supersede_sentence` (whole turn). Decided per message:
        what two statements are about is the message's subject, which comparing the two alone
        cannot tell ("Our cat is called Miso." and "Our dog is called Pepper." score like a
        correction)."""
        sentence = self._sentence_index()

        def corrects(new: int, old: int) -> bool:
            a, b = self.traces[new], self.traces[old]
            if a.written <= b.written or a.said_at == b.said_at or gains[new] < gains[old] - self.cfg.supersede_gap:
                return False
            query = self._trace_keys(new)
            token = float(late_interaction(query, self._trace_keys(old), np.zeros(1, dtype=np.int64),
                                           self._token_weights(query))[0])
            return token >= self.cfg.supersede and float(sentence[new] @ sentence[old]) >= self.cfg.supersede_sentence

        return [i for i in order if not any(corrects(j, i) for j in order if j != i)]

    def relevance(self, traces: Sequence[Trace], text: str) -> list[Support]:
        """What each statement does for the message, under the frozen model, in one batched forward
        (with the message alone, unless cached): `gain`, the mean gain in log-probability of the
        message's tokens when the statement precedes them in the user's turn (pointwise mutual
        information; about 0 for a statement that has nothing to do with it); and `uncovered`, the
        surprisal of the message's least explained token: the highest, over tokens the statement makes
        likelier by less than `cover_gain` nats, of their surprisal after it. A question about a
        neighbouring subject often keeps one ("dentist" after "My driving test is on Friday.": 13.6
        nats) where the statement's own subject becomes likely. Each sentence's first token (where one
        sentence meets the next) is left out, and a message of several sentences counts its best
        explained sentence (the question inside a longer message decides, as in the first stage)."""
        if not traces:
            return []
        ids, _, content = self._turn(text)
        content = content[-self.cfg.max_trace_tokens:] or [len(ids) - 1]
        alone = self._logprobs.get(text)
        rows, tails = [], []
        for trace in traces:
            joined, _, joined_content = self._turn(f"{self._text(trace)} {text}")
            tails.append(np.asarray(joined_content[-len(content):]))
            rows.append(joined[: tails[-1][-1] + 1])
        if alone is None:
            rows.append(ids[: content[-1] + 1])
        scored = self._model.token_logprobs(rows)
        if alone is None:
            alone = self._logprobs.put(text, scored.pop()[np.asarray(content) - 1])
        covering = self.cfg.cover_surprisal > 0
        starts = self._sentence_starts([ids[i] for i in content], text) if covering else [0]
        out = []
        for row, tail in zip(scored, tails, strict=True):
            after = row[tail - 1]
            gain = after - alone
            out.append(Support(float(np.mean(gain)), self._uncovered(-after, gain, starts) if covering else 0.0))
        return out

    def _sentence_starts(self, tokens: Sequence[int], text: str) -> list[int]:
        """Where each sentence of `text` (`sentences`, the split the first stage routes on) starts in
        `tokens`, its content tokens; a one-sentence message is [0], with nothing decoded."""
        parts = sentences(text)
        if len(parts) < 2:
            return [0]
        full, ends = self._model.decode(list(tokens)), []
        for part in parts[:-1]:  # a sentence cut off by the token limit is not found: it joins the next
            at = full.find(part, ends[-1] if ends else 0)
            if at >= 0:
                ends.append(at + len(part))
        starts = [0]
        for k in range(1, len(tokens)):
            if len(starts) <= len(ends) and len(self._model.decode(list(tokens[:k]))) >= ends[len(starts) - 1]:
                starts.append(k)
        return starts

    def _uncovered(self, surprisal: np.ndarray, gain: np.ndarray, starts: list[int]) -> float:
        """The least explained token's surprisal in the best explained sentence (0: all explained)."""
        worst = []
        for a, b in zip(starts, [*starts[1:], len(surprisal)], strict=True):
            left = [float(surprisal[t]) for t in range(a + 1, b) if gain[t] < self.cfg.cover_gain]
            worst.append(max(left, default=0.0))
        return min(worst)


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()

