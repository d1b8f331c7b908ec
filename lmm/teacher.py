"""The teacher of consolidation: the questions the frozen model asks about a statement, and the answers it
gives while reading it.

Owns the few-shot reading task (`SHOTS`), the checks on what the teacher writes (an answer must use the
statement, forward questions leave out its names and numbers, nothing copied from a few-shot example)
and how it is decoded: the questions of one statement and their answers run as the rows of one batch
(`Backend.decode_rows`), each row a question (the first greedy, the others sampled with their own seeds)
followed by its greedy answer. It trains nothing and knows no chat format (`lmm.consolidation` turns the
pairs into the student's examples).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmm.backends.base import Backend, DecodingConfig
from lmm.backends.decoding import sample_token
from lmm.memory.trace_gate import sentences

# A reading task the frozen model completes: statement, question, answer. Generic examples (the
# write gate's kind of sentences). The questions are the user's own, later, about their world: in the
# first person where the statement is, never naming what they ask for (a question that names the answer
# teaches a chapter to repeat the question), forward and reverse ("Who is Pepper?"), answered in the
# second person.
SHOTS = (
    ("The spare key is under the blue flowerpot.", "Where is the spare key?",
     "The spare key is under the blue flowerpot."),
    ("My cousin Ignatius lives in Winnipeg.", "Where does my cousin live?", "Your cousin Ignatius lives in Winnipeg."),
    ("Our landlord is called Mr Haverford.", "What is our landlord's name?", "Your landlord is called Mr Haverford."),
    ("I started learning the accordion in September.", "Which instrument am I learning?",
     "You are learning the accordion; you started in September."),
    ("The book club meets on the second Tuesday of each month.", "When does the book club meet?",
     "The book club meets on the second Tuesday of each month."),
    ("My neighbour's dog is called Pepper.", "Who is Pepper?", "Pepper is your neighbour's dog."),
    ("Hey, I'm Rosalind, I just joined the team.", "What is my name?", "Your name is Rosalind."),
)
HEAD = "".join(f"Statement: {s}\nQuestion: {q}\nAnswer: {a}\n\n" for s, q, a in SHOTS)
_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def uses_statement(statement: str, question: str, answer: str) -> bool:
    """The answer carries a word of the statement that the question did not give (it read the statement)."""
    return bool((_words(statement) - _words(question)) & _words(answer))


def named_words(text: str) -> set[str]:
    """The names and numbers of `text` (lower-cased): words with a digit, or capitalised past a sentence's
    first word. What a user asks for is most often one of them; scripts without case give names none."""
    out: set[str] = set()
    for sentence in sentences(text):
        for k, m in enumerate(_WORD.finditer(sentence)):
            word = m.group()
            if any(c.isdigit() for c in word) or (k > 0 and len(word) > 1 and word[0].isupper()):
                out.add(word.lower())
    return out


def is_forward(statement: str, question: str) -> bool:
    """A question that leaves out every name and number of the statement ("What is my niece's name?",
    not "What is Anouk's name?"): the kind a user asks later, when they need the memory."""
    return not (named_words(statement) & _words(question))


# Names the few-shot examples carry; a teacher question or answer with one that the statement lacks copied
# it from an example ("... a girl named Rosalind.", "How does my neighbour Rosalind help me?").
_SHOT_NAMES = frozenset().union(*(named_words(" ".join(shot)) for shot in SHOTS))


def copies_a_shot(text: str, *given: str) -> bool:
    """`text` carries a few-shot example's name that none of `given` (the statement, the question) has."""
    return bool((_SHOT_NAMES & _words(text)).difference(*(_words(g) for g in given)))


def question_prompt(statement: str) -> str:
    return f"{HEAD}Statement: {statement}\nQuestion:"


def answer_prompt(statement: str, question: str) -> str:
    return f"{HEAD}Statement: {statement}\nQuestion: {question}\nAnswer:"


@dataclass
class TeacherConfig:
    """The decoding part of `lmm.consolidation.ConsolidationConfig` (which checks the values)."""

    questions: int
    forward_tries: int
    temperature: float
    max_tokens: int
    seed: int


class _Row:
    """One `decode_rows` row: a question up to the end of its line, then, when the tokens so far are how
    the answer's prompt encodes, that prompt's remaining tokens ("\\nAnswer:") one per step, and the greedy
    answer up to the end of its line. `answer` stays None when the row could not go on to it (the caller
    then answers the question alone, as before batching)."""

    def __init__(self, backend: Backend, statement: str, prompt: list[int], greedy: bool, seed: int,
                 cfg: TeacherConfig) -> None:
        self.backend, self.statement, self.prompt, self.cfg = backend, statement, prompt, cfg
        self.strategy = "greedy" if greedy else "sample"
        self.rng = np.random.default_rng(seed)
        self.question_ids: list[int] = []
        self.forced: list[int] = []
        self.answer_ids: list[int] = []
        self.phase = "question"
        self.question: str | None = None
        self.answer: str | None = None

    def _line(self, ids: list[int]) -> tuple[str, bool]:
        text = self.backend.formatter.decode(ids)
        return text.split("\n")[0].strip(), "\n" in text

    def next_token(self, scores: np.ndarray) -> int | None:
        stop = self.backend.formatter.stop_ids
        if self.phase == "question":
            # top_p 0.9: DecodingConfig's default, which the teacher's questions were sampled with
            tok = sample_token(scores, self.strategy, self.cfg.temperature, DecodingConfig.top_p, self.rng)
            if tok in stop:
                return self._after_question(None)
            self.question_ids.append(tok)
            ended = self._line(self.question_ids)[1]
            return self._after_question(tok) if ended or len(self.question_ids) == self.cfg.max_tokens else tok
        if self.phase == "forced":
            if self.forced:
                return self.forced.pop(0)
            self.phase = "answer"
        if self.phase == "answer":
            tok = int(np.argmax(scores))
            if tok not in stop:
                self.answer_ids.append(tok)
            if tok in stop or self._line(self.answer_ids)[1] or len(self.answer_ids) == self.cfg.max_tokens:
                self.answer, self.phase = self._line(self.answer_ids)[0], "done"
                return None
            return tok
        return None

    def _after_question(self, tok: int | None) -> int | None:
        """The question is written: go on to its answer (feeding `tok`, the line's end, first) or stop."""
        self.question, self.phase = self._line(self.question_ids)[0], "done"
        if not self.question.endswith("?"):
            return None  # never answered
        fed = self.prompt + self.question_ids
        canonical = self.backend.formatter.encode(answer_prompt(self.statement, self.question))
        if canonical[: len(fed)] != fed or len(canonical) == len(fed):
            return None  # the prompt encodes otherwise: answered alone
        self.forced, self.phase = canonical[len(fed):], "forced"
        return tok if tok is not None else self.forced.pop(0)


class Teacher:
    """The frozen model of one backend asking and answering questions about statements."""

    def __init__(self, backend: Backend, config: TeacherConfig) -> None:
        self.backend, self.config = backend, config

    def _complete(self, text: str, decoding: DecodingConfig) -> str:
        """The frozen model's continuation of raw `text` up to the end of the line."""
        fmt = self.backend.formatter
        out: list[int] = []
        with self.backend.frozen():
            for tok in self.backend.generate(fmt.encode(text), decoding):
                out.append(tok)
                if "\n" in fmt.decode(out):
                    break
        return fmt.decode(out).split("\n")[0].strip()

    def _rows(self, statement: str, seeds: Sequence[int]) -> list[_Row]:
        cfg = self.config
        prompt = self.backend.formatter.encode(question_prompt(statement))
        rows = [_Row(self.backend, statement, prompt, k == 0, cfg.seed + k, cfg) for k in seeds]
        self.backend.decode_rows(prompt, rows, max_steps=2 * cfg.max_tokens + 16)
        return rows

    def _answer(self, row: _Row) -> str:
        if row.answer is not None:
            return row.answer
        greedy = DecodingConfig(strategy="greedy", max_tokens=self.config.max_tokens, repetition_penalty=1.0)
        return self._complete(answer_prompt(row.statement, row.question or ""), greedy)

    def pairs(self, statement: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The (question, answer) pairs kept for `statement`, and those dropped because the answer did not
        use the statement. The first `questions` rows run as one batch; past them, while no kept question
        is forward, `forward_tries` more run as a second batch and only forward ones are kept (a statement
        whose questions all name the answer gave its memory no route from the question a user asks: "What
        is Priya's name?" and no "What is my sister's name?")."""
        cfg = self.config
        kept: list[tuple[str, str]] = []
        dropped: list[tuple[str, str]] = []
        seen: set[str] = set()

        def take(row: _Row, extra: bool) -> None:
            question = row.question or ""
            if not question.endswith("?") or question.lower() in seen:
                return
            seen.add(question.lower())
            if (extra and not is_forward(statement, question)) or copies_a_shot(question, statement):
                return
            answer = self._answer(row)
            if not answer or not uses_statement(statement, question, answer) or copies_a_shot(
                    answer, statement, question):
                dropped.append((question, answer))
            else:
                kept.append((question, answer))

        for row in self._rows(statement, range(cfg.questions)):
            take(row, extra=False)
        if cfg.forward_tries and not any(is_forward(statement, q) for q, _ in kept):
            for row in self._rows(statement, range(cfg.questions, cfg.questions + cfg.forward_tries)):
                take(row, extra=True)
                if any(is_forward(statement, q) for q, _ in kept):
                    break
        return kept, dropped
