import itertools
import json
import re
from pathlib import Path

import pytest

from lmm.bench.metrics import normalize, recalls
from lmm.bench.scenarios import (
    Scenario,
    ScenarioError,
    load_distractors,
    load_probes,
    load_scenarios,
)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCENARIO_FILES = ("facts.jsonl", "lifelong.jsonl", "heldout_example.jsonl")
KINDS = {"person", "place", "job", "preference", "date", "number", "object"}
NAME_RE = re.compile(r"^(?P<kind>[a-z]+)_[a-z0-9_]+$")


def _raw(name: str) -> list[dict]:
    return [
        json.loads(line) for line in (BENCH / name).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


@pytest.fixture(scope="module")
def pool() -> list[str]:
    return load_distractors(BENCH / "distractors.jsonl")


@pytest.fixture(scope="module")
def probes() -> list[str]:
    return load_probes(BENCH / "probes.jsonl")


@pytest.fixture(scope="module")
def shipped(pool: list[str]) -> dict[str, list[Scenario]]:
    return {name: load_scenarios(BENCH / name, pool) for name in SCENARIO_FILES}


@pytest.fixture(scope="module")
def everything(shipped: dict[str, list[Scenario]]) -> list[Scenario]:
    return [s for name in SCENARIO_FILES for s in shipped[name]]


# --- shipped files: counts ------------------------------------------------------


def test_shipped_counts(shipped: dict[str, list[Scenario]], pool: list[str], probes: list[str]) -> None:
    assert len(shipped["facts.jsonl"]) >= 24
    assert len(shipped["lifelong.jsonl"]) == 50
    assert len(shipped["heldout_example.jsonl"]) == 6
    assert len(pool) >= 30
    assert len(probes) >= 24


def test_facts_mostly_use_five_pool_distractors() -> None:
    raw = _raw("facts.jsonl")
    fives = sum(1 for r in raw if r["distractors"] == 5)
    explicit = sum(1 for r in raw if isinstance(r["distractors"], list))
    assert fives > len(raw) / 2
    assert explicit >= 1


def test_lifelong_distractors_are_zero_or_one() -> None:
    for r in _raw("lifelong.jsonl"):
        assert r["distractors"] in (0, 1), r["name"]


def test_resolved_distractor_lengths(shipped: dict[str, list[Scenario]]) -> None:
    for name in SCENARIO_FILES:
        for raw, scenario in zip(_raw(name), shipped[name], strict=True):
            want = raw["distractors"] if isinstance(raw["distractors"], int) else len(raw["distractors"])
            assert len(scenario.distractors) == want, scenario.name


def test_pool_distractors_differ_between_scenarios(shipped: dict[str, list[Scenario]]) -> None:
    drawn = [
        s.distractors
        for raw, s in zip(_raw("facts.jsonl"), shipped["facts.jsonl"], strict=True)
        if isinstance(raw["distractors"], int)
    ]
    assert len(set(drawn)) == len(drawn)


def test_text_lists_are_unique(pool: list[str], probes: list[str]) -> None:
    assert len({normalize(t) for t in pool}) == len(pool)
    assert len({normalize(p) for p in probes}) == len(probes)


# --- shipped files: content -----------------------------------------------------


def test_names_unique_and_well_formed(everything: list[Scenario]) -> None:
    names = [s.name for s in everything]
    assert len(set(names)) == len(names)
    for name in names:
        m = NAME_RE.match(name)
        assert m is not None, name
        assert m["kind"] in KINDS, name


def test_queries_unique_across_files(everything: list[Scenario]) -> None:
    queries = [normalize(s.query) for s in everything]
    assert len(set(queries)) == len(queries)


@pytest.mark.parametrize("name", ["facts.jsonl", "lifelong.jsonl"])
def test_every_kind_represented(shipped: dict[str, list[Scenario]], name: str) -> None:
    kinds = {s.name.split("_", 1)[0] for s in shipped[name]}
    assert kinds == KINDS


def test_facts_cover_required_subjects(shipped: dict[str, list[Scenario]]) -> None:
    names = {s.name for s in shipped["facts.jsonl"]}
    required = {
        "person_user_name",
        "person_best_friend",
        "person_dog_name",
        "place_city_lived",
        "place_birthplace",
        "job_user",
        "preference_food",
        "preference_colour",
        "preference_music",
        "date_birthday",
        "date_anniversary",
        "number_house",
        "number_locker_code",
        "number_age",
        "object_car",
    }
    assert required <= names


def test_queries_are_questions(everything: list[Scenario]) -> None:
    for s in everything:
        assert s.query.rstrip().endswith("?"), s.name


def test_expect_not_in_own_query(everything: list[Scenario]) -> None:
    for s in everything:
        assert not recalls(s.query, s.expect), s.name
        query_words = set(re.findall(r"\w+", normalize(s.query)))
        for keyword in s.expect:
            assert not set(re.findall(r"\w+", normalize(keyword))) <= query_words, (s.name, keyword)


def test_teach_states_the_fact(everything: list[Scenario]) -> None:
    for s in everything:
        assert recalls(" ".join(s.teach), s.expect), s.name


def test_facts_do_not_leak_into_other_scenarios(everything: list[Scenario]) -> None:
    for a, b in itertools.permutations(everything, 2):
        text = " ".join((*b.teach, *b.distractors, b.query))
        assert not recalls(text, a.expect), (a.name, b.name)


def test_facts_do_not_leak_into_pool_or_probes(
    everything: list[Scenario], pool: list[str], probes: list[str]
) -> None:
    for s in everything:
        for text in (*pool, *probes):
            assert not recalls(text, s.expect), (s.name, text)


def test_lifelong_distinct_from_facts(shipped: dict[str, list[Scenario]]) -> None:
    facts = shipped["facts.jsonl"]
    lifelong = shipped["lifelong.jsonl"]
    fact_keywords = {normalize(k) for s in facts for k in s.expect}
    for s in lifelong:
        assert not fact_keywords & {normalize(k) for k in s.expect}, s.name
    assert not {normalize(t) for s in facts for t in s.teach} & {
        normalize(t) for s in lifelong for t in s.teach
    }


# --- loader behaviour -------------------------------------------------------------


def _write(tmp_path: Path, lines: list[str], name: str = "s.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


_MISSING = object()


def _row(**overrides: object) -> str:
    row: dict[str, object] = {
        "name": "x",
        "teach": ["My sister's name is Priya."],
        "distractors": 0,
        "query": "What is my sister's name?",
        "expect": ["Priya"],
    }
    row.update(overrides)
    return json.dumps({k: v for k, v in row.items() if v is not _MISSING})


def test_round_robin_is_deterministic_and_wraps(tmp_path: Path) -> None:
    pool = ["d0", "d1", "d2", "d3", "d4"]
    path = _write(
        tmp_path,
        [
            _row(name="a", distractors=2),
            _row(name="b", distractors=2),
            _row(name="c", distractors=["own"]),
            _row(name="d", distractors=2),
            _row(name="e", distractors=0),
            _row(name="f", distractors=5),
        ],
    )
    got = load_scenarios(path, pool)
    assert [s.distractors for s in got] == [
        ("d0", "d1"),
        ("d2", "d3"),
        ("own",),
        ("d4", "d0"),
        (),
        ("d1", "d2", "d3", "d4", "d0"),
    ]
    assert load_scenarios(path, pool) == got


def test_scenario_fields_are_tuples(tmp_path: Path) -> None:
    path = _write(tmp_path, [_row(teach=["one", "two"], expect=["A", "B"])])
    (s,) = load_scenarios(path, [])
    assert s == Scenario("x", ("one", "two"), (), "What is my sister's name?", ("A", "B"))
    with pytest.raises(AttributeError):
        s.name = "y"  # type: ignore[misc]


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = _write(tmp_path, ["", _row(name="a"), "   ", '{"name": "b"'])
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path, [])
    assert info.value.line == 4
    assert "line 4" in str(info.value)


@pytest.mark.parametrize(
    ("bad_line", "field", "fragment"),
    [
        ("{not json", None, "invalid JSON"),
        ("[1, 2]", None, "JSON object"),
        (_row(query=_MISSING), "query", "missing"),
        (_row(name=_MISSING), "name", "missing"),
        (_row(teach=_MISSING), "teach", "missing"),
        (_row(expect=_MISSING), "expect", "missing"),
        (_row(distractors=_MISSING), "distractors", "missing"),
        (_row(teach="My sister's name is Priya."), "teach", "list"),
        (_row(teach=[]), "teach", "empty"),
        (_row(teach=["ok", 3]), "teach", "item 1"),
        (_row(teach=["ok", "  "]), "teach", "item 1"),
        (_row(expect=[]), "expect", "empty"),
        (_row(expect="Priya"), "expect", "list"),
        (_row(query=42), "query", "string"),
        (_row(query=""), "query", "empty"),
        (_row(name=""), "name", "empty"),
        (_row(distractors=True), "distractors", "int"),
        (_row(distractors=2.5), "distractors", "int"),
        (_row(distractors=-1), "distractors", "negative"),
        (_row(distractors=99), "distractors", "pool"),
        (_row(distractors=[1]), "distractors", "item 0"),
        (_row(name="first"), "name", "duplicate"),
    ],
)
def test_malformed_line_reports_file_line_and_field(
    tmp_path: Path, bad_line: str, field: str | None, fragment: str
) -> None:
    path = _write(tmp_path, [_row(name="first"), _row(name="second", distractors=1), bad_line], "bad.jsonl")
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path, ["d0", "d1", "d2"])
    err = info.value
    message = str(err)
    assert err.line == 3
    assert "bad.jsonl" in message
    assert "line 3" in message
    assert fragment in message
    assert err.field == field
    if field is not None:
        assert f"'{field}'" in message


def test_missing_file_raises_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="nope.jsonl"):
        load_scenarios(tmp_path / "nope.jsonl", [])


def test_probe_and_distractor_loaders(tmp_path: Path) -> None:
    probes = _write(
        tmp_path, ['{"prompt": "What is 2 plus 2?"}', "", '{"prompt": "Define rain."}'], "p.jsonl"
    )
    assert load_probes(probes) == ["What is 2 plus 2?", "Define rain."]
    texts = _write(tmp_path, ['{"text": "Why is the sky blue?"}'], "d.jsonl")
    assert load_distractors(texts) == ["Why is the sky blue?"]


@pytest.mark.parametrize(
    ("loader", "lines", "line", "field"),
    [
        (load_probes, ['{"prompt": "ok"}', '{"text": "wrong key"}'], 2, "prompt"),
        (load_probes, ['{"prompt": 5}'], 1, "prompt"),
        (load_distractors, ['{"text": "ok"}', '{"text": "ok"}', '{"text": ""}'], 3, "text"),
        (load_distractors, ['{"text": "ok"', '{"text": "ok"}'], 1, None),
    ],
)
def test_probe_and_distractor_errors(
    tmp_path: Path, loader, lines: list[str], line: int, field: str | None
) -> None:
    path = _write(tmp_path, lines, "x.jsonl")
    with pytest.raises(ScenarioError) as info:
        loader(path)
    assert info.value.line == line
    assert info.value.field == field
    assert f"line {line}" in str(info.value)
    assert "x.jsonl" in str(info.value)
