"""Pure-Python benchmark metrics (no model code, no numpy).

Recall matching rules (:func:`recalls`)
---------------------------------------
* Case-insensitive (``str.casefold``) and accent-insensitive: combining marks are
  removed after NFKD, so "Comte" matches "Comté".  Letters that do not decompose
  (for example "ø") are kept, so list spelling variants in ``expect`` if needed.
  Curly apostrophes are treated as straight ones.
* Whole words only: a keyword must not be preceded or followed by a letter, digit
  or underscore.  So "Bob" does NOT match "Bobby", but does match "Bob's" and
  "Bob.".  Multi-word keywords match across any run of whitespace.
* Whole numbers only: a keyword that starts or ends with a digit must not touch
  another digit, nor a decimal point / thousands separator followed by a digit.
  So "12" does not match "123", "3.12", "12.5" or "12,000", nor the ordinal
  "12th" (list "12th" separately when ordinals are acceptable).

Degeneration rules (:func:`is_degenerate`)
------------------------------------------
Words are runs of letters/digits (inner apostrophes and hyphens kept), compared
case-insensitively with surrounding punctuation dropped.  A text is degenerate when

* it has no words at all (empty or punctuation only), or
* one word occurs more than ``MAX_RUN`` (4) times in a row, or
* it has at least ``MIN_WORDS_FOR_BIGRAMS`` (8) words and fewer than half of its
  word bigrams are distinct.  Shorter texts are exempt from the bigram test
  because a handful of words gives too few bigrams to judge looping.

Loop rule (:func:`has_loop`, milder than degeneration): a text loops when one of its
sentences of at least ``LOOP_NGRAM`` (4) words occurs twice, or when one word
``LOOP_NGRAM``-gram occurs ``LOOP_REPEATS`` (3) or more times.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Hashable, Iterable, Sequence
from functools import lru_cache
from typing import TypeVar

__all__ = [
    "MAX_RUN",
    "MIN_BIGRAM_RATIO",
    "MIN_WORDS_FOR_BIGRAMS",
    "distinct_bigram_ratio",
    "exact_match",
    "has_loop",
    "is_degenerate",
    "median",
    "normalize",
    "p95",
    "percentile",
    "recalls",
    "token_agreement",
    "words",
]

T = TypeVar("T", bound=Hashable)

MAX_RUN = 4
MIN_WORDS_FOR_BIGRAMS = 8
MIN_BIGRAM_RATIO = 0.5
LOOP_NGRAM = 4
LOOP_REPEATS = 3
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")

_WORD_RE = re.compile(r"\w+(?:['-]\w+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def normalize(text: str) -> str:
    """Casefold, strip accents and straighten apostrophes."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", stripped).casefold()


@lru_cache(maxsize=4096)
def _keyword_pattern(keyword: str) -> re.Pattern[str] | None:
    parts = normalize(keyword).split()
    if not parts:
        return None
    body = r"\s+".join(re.escape(p) for p in parts)
    left = r"(?<!\w)"
    right = r"(?!\w)"
    if body[0].isdigit():
        left += r"(?<!\d[.,])"
    if body[-1].isdigit():
        right += r"(?![.,]\d)"
    return re.compile(left + body + right)


def recalls(answer: str, expect: Sequence[str]) -> bool:
    """True when ``answer`` contains any keyword of ``expect`` as a whole word (see module doc)."""
    text = normalize(answer)
    for keyword in expect:
        pattern = _keyword_pattern(keyword)
        if pattern is not None and pattern.search(text):
            return True
    return False


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` with punctuation stripped."""
    return _WORD_RE.findall(normalize(text))


def distinct_bigram_ratio(tokens: Sequence[str]) -> float:
    """Distinct bigrams / all bigrams; 1.0 when there are fewer than two tokens."""
    bigrams = list(zip(tokens, tokens[1:], strict=False))
    if not bigrams:
        return 1.0
    return len(set(bigrams)) / len(bigrams)


def _longest_run(tokens: Sequence[str]) -> int:
    best = run = 0
    prev: str | None = None
    for tok in tokens:
        run = run + 1 if tok == prev else 1
        prev = tok
        best = max(best, run)
    return best


def is_degenerate(text: str) -> bool:
    """True for empty, stuttering or looping text (see module doc for the exact rules)."""
    tokens = words(text)
    if not tokens:
        return True
    if _longest_run(tokens) > MAX_RUN:
        return True
    if len(tokens) >= MIN_WORDS_FOR_BIGRAMS and distinct_bigram_ratio(tokens) < MIN_BIGRAM_RATIO:
        return True
    return False


def has_loop(text: str) -> bool:
    """True when a sentence is repeated or a word n-gram keeps coming back (see module doc)."""
    seen: set[tuple[str, ...]] = set()
    for sentence in _SENTENCE_END.split(text):
        key = tuple(words(sentence))
        if len(key) >= LOOP_NGRAM:
            if key in seen:
                return True
            seen.add(key)
    tokens = words(text)
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - LOOP_NGRAM + 1):
        gram = tuple(tokens[i:i + LOOP_NGRAM])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= LOOP_REPEATS:
            return True
    return False


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions where ``a`` and ``b`` hold the same token, over the longer length.

    Positions past the end of the shorter sequence count as disagreements.
    Two empty sequences agree fully (1.0).
    """
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    same = sum(1 for x, y in zip(a, b, strict=False) if x == y)
    return same / longest


def exact_match(a: Sequence[T], b: Sequence[T]) -> bool:
    """True when both sequences have the same length and the same items in order."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b, strict=True))


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks.

    Matches numpy's default ("linear") method.  NaN for an empty input.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    data = sorted(float(v) for v in values)
    if not data:
        return math.nan
    rank = (len(data) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    frac = rank - lo
    if frac == 0.0:
        return data[lo]
    return data[lo] + (data[hi] - data[lo]) * frac


def median(values: Iterable[float]) -> float:
    """Median of ``values``; NaN for an empty input."""
    return percentile(values, 50.0)


def p95(values: Iterable[float]) -> float:
    """95th percentile of ``values`` (linear interpolation); NaN for an empty input."""
    return percentile(values, 95.0)
