import math

import pytest

from lmm.bench.metrics import (
    distinct_bigram_ratio,
    exact_match,
    is_degenerate,
    median,
    p95,
    percentile,
    recalls,
    token_agreement,
    words,
)

# --- is_degenerate -----------------------------------------------------------


def test_repeated_name_is_degenerate() -> None:
    assert is_degenerate("Alice Alice Alice Alice Alice")


def test_looping_template_is_degenerate() -> None:
    text = "Your name is: User's Name is: User's Name is: User's Name is: User's Name is:"
    assert is_degenerate(text)


@pytest.mark.parametrize(
    "text",
    [
        "Your sister's name is Priya.",
        "The capital of France is Paris, which sits on the river Seine.",
        "Rainbows form when sunlight is refracted, reflected and dispersed inside raindrops.",
        "Yes.",
        "42",
    ],
)
def test_normal_text_is_not_degenerate(text: str) -> None:
    assert not is_degenerate(text)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...!?", "** -- **"])
def test_empty_or_punctuation_only_is_degenerate(text: str) -> None:
    assert is_degenerate(text)


def test_run_of_four_is_allowed_run_of_five_is_not() -> None:
    assert not is_degenerate("no no no no, I said")
    assert is_degenerate("no no no no no, I said")


def test_run_ignores_case_and_punctuation() -> None:
    assert is_degenerate("Alice, alice! ALICE. Alice? alice")


def test_bigram_rule_needs_eight_words() -> None:
    # 7 words alternating: too short for the bigram rule, and no run above 4.
    assert not is_degenerate("a b a b a b a")
    # 8 words: 2 distinct bigrams out of 7 -> ratio < 0.5.
    assert is_degenerate("a b a b a b a b")


def test_distinct_bigram_ratio() -> None:
    assert distinct_bigram_ratio([]) == 1.0
    assert distinct_bigram_ratio(["x"]) == 1.0
    assert distinct_bigram_ratio(["a", "b", "c"]) == 1.0
    assert distinct_bigram_ratio(["a", "b", "a", "b"]) == pytest.approx(2 / 3)


def test_words_strip_punctuation_and_case() -> None:
    assert words("Hello, WORLD! It's fine.") == ["hello", "world", "it's", "fine"]


# --- recalls -----------------------------------------------------------------


def test_recall_is_case_insensitive() -> None:
    assert recalls("your sister is PRIYA", ["Priya"])
    assert recalls("priya", ["PRIYA"])


def test_recall_whole_words_only() -> None:
    assert not recalls("His name is Bobby.", ["Bob"])
    assert not recalls("tealblue", ["teal"])
    assert recalls("It's Bob.", ["Bob"])
    assert recalls("That is Bob's car.", ["Bob"])
    assert recalls("(Bob)", ["Bob"])


def test_recall_any_keyword_counts() -> None:
    assert recalls("You drive a Forester.", ["Subaru", "Forester"])
    assert not recalls("You drive a Volvo.", ["Subaru", "Forester"])


def test_recall_empty_inputs() -> None:
    assert not recalls("anything", [])
    assert not recalls("", ["Priya"])
    assert not recalls("anything", ["", "   "])


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Your code is 12.", True),
        ("12", True),
        ("It is 12, I think", True),
        ("123", False),
        ("312", False),
        ("3.12", False),
        ("12.5", False),
        ("12,000", False),
        ("the 12th", False),
        ("A12", False),
    ],
)
def test_recall_numbers_are_whole(answer: str, expected: bool) -> None:
    assert recalls(answer, ["12"]) is expected


def test_recall_multiword_keyword() -> None:
    assert recalls("It is on the 14th of March.", ["14th of March"])
    assert recalls("It is on the 14th  of\nMarch.", ["14th of March"])
    assert not recalls("It is on the 14th of Marchmont.", ["14th of March"])
    assert recalls("You are an air traffic controller.", ["air traffic controller"])


def test_recall_accents_and_apostrophes() -> None:
    assert recalls("You like Comte.", ["Comté"])
    assert recalls("You like COMTÉ.", ["comte"])
    assert recalls("It is Priya\u2019s", ["Priya's"])
    assert not recalls("Tromso", ["Tromsø"])  # ø does not decompose; list variants in expect


# --- token agreement / exact match --------------------------------------------


def test_token_agreement() -> None:
    assert token_agreement([], []) == 1.0
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 3], [1, 9, 3]) == pytest.approx(2 / 3)
    assert token_agreement([1, 2, 3, 4], [1, 2]) == pytest.approx(0.5)
    assert token_agreement([1, 2], [1, 2, 3, 4]) == pytest.approx(0.5)
    assert token_agreement([], [1]) == 0.0
    assert token_agreement([5, 6], [6, 5]) == 0.0


def test_exact_match() -> None:
    assert exact_match([], [])
    assert exact_match([1, 2, 3], (1, 2, 3))
    assert not exact_match([1, 2, 3], [1, 2])
    assert not exact_match([1, 2], [1, 2, 3])
    assert not exact_match([1, 2, 3], [1, 2, 4])


# --- timing helpers -----------------------------------------------------------


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([7.0]) == 7.0
    assert math.isnan(median([]))


def test_p95() -> None:
    assert math.isnan(p95([]))
    assert p95([5.0]) == 5.0
    assert p95([float(i) for i in range(1, 101)]) == pytest.approx(95.05)
    assert p95([0.0, 10.0]) == pytest.approx(9.5)
    # order does not matter
    assert p95([10.0, 0.0]) == pytest.approx(9.5)


def test_percentile_bounds() -> None:
    data = [1.0, 2.0, 3.0]
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 3.0
    with pytest.raises(ValueError):
        percentile(data, 101)


def test_helpers_accept_generators() -> None:
    assert median(x for x in [1.0, 2.0, 3.0]) == 2.0
