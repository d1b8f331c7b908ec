"""The ability benchmark and the LoCoMo adapter: case files, scoring, first-person rewriting, and
`python -m lmm.bench --abilities / --locomo` end to end on a tiny random model (torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmm.bench.__main__ import main as bench_main
from lmm.bench.abilities import Case, load_cases, passes, summarize, takes_identity
from lmm.bench.locomo import content_words, first_person, load_locomo
from lmm.bench.scenarios import ScenarioError

ROOT = Path(__file__).resolve().parents[1]

# A tiny synthetic conversation in LoCoMo's layout (the real ones stay out of the repository).
LOCOMO = {
    "speaker_a": "Rowena Hale", "speaker_b": "Tomas",
    "session_1_date_time": "1:00 pm on 2 May, 2023",
    "session_1": [
        {"speaker": "Rowena Hale", "dia_id": "D1:1", "text": "Hi Tomas! I just adopted a ferret called Nutmeg."},
        {"speaker": "Tomas", "dia_id": "D1:2", "text": "Cute! I went hiking in Wales."},
    ],
    "session_2": [
        {"speaker": "Rowena Hale", "dia_id": "D2:1", "text": "My sister Imke is visiting from Bremen."},
        {"speaker": "Tomas", "dia_id": "D2:2", "text": "Enjoy!"},
    ],
    "qa": [
        {"question": "What is Rowena's ferret called?", "answer": "Nutmeg", "evidence": ["D1:1"], "category": 4},
        {"question": "Where is Rowena's sister visiting from?", "answer": "Bremen", "evidence": ["D2:1"],
         "category": 4},
        {"question": "Where did Tomas go hiking?", "answer": "Wales", "evidence": ["D1:2"], "category": 4},
        {"question": "When did Rowena adopt a ferret?", "answer": "May 2023", "evidence": ["D1:1"], "category": 2},
    ],
}


def test_the_shipped_ability_sets_load_and_keep_test_and_dev_apart() -> None:
    pool = ["Why is the sky blue?", "Tell me a joke."]
    test, test_unrelated = load_cases(ROOT / "benchmarks" / "abilities", pool)
    dev, dev_unrelated = load_cases(ROOT / "benchmarks" / "dev" / "abilities", pool)
    abilities = {"abstention", "correction", "identity", "impersonal", "paraphrase", "two_facts"}
    assert {c.ability for c in test} == {c.ability for c in dev} == abilities
    assert test_unrelated and dev_unrelated and not set(test_unrelated) & set(dev_unrelated)
    taught = {m for c in dev for m in c.taught}
    assert not any(m in taught for c in test for m in c.taught)
    assert all(len(c.distractors) == 3 for c in test)
    assert all(len(c.sessions) == 2 and c.reject for c in test if c.ability == "correction")
    assert all(not c.expect and c.reject for c in test if c.ability == "abstention")


def test_case_files_are_checked(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps({"name": "x", "teach": ["a"], "query": "q", "expect": []}) + "\n")
    with pytest.raises(ScenarioError, match="abstention"):
        load_cases(tmp_path, [])
    with pytest.raises(ValueError, match="no ability files"):
        load_cases(tmp_path / "missing", [])


def test_scoring_passes_rejects_and_identity() -> None:
    case = Case(name="c", ability="correction", sessions=(("a",),), query="q", expect=("Ghent",), reject=("Porto",))
    assert passes("You live in Ghent.", case) and not passes("Ghent, formerly Porto.", case)
    assert not passes("I do not know.", case)
    never = Case(name="n", ability="abstention", sessions=(("a",),), query="q", expect=(), reject=("Rex",))
    assert passes("I don't know your cat's name.", never) and not passes("It is Rex.", never)
    name = Case(name="i", ability="identity", sessions=(("a",),), query="What is my name?", expect=("Alice",))
    assert takes_identity("Hello! I am Alice, a curious fellow.", name)
    assert not takes_identity("Your name is Alice. I hope that helps.", name)
    half = Case(name="h", ability="locomo", sessions=(), query="q", expect=("adoption", "agencies", "research"),
                match="half")
    assert passes("I am looking at adoption agencies.", half) and not passes("Something about adoption.", half)
    records = [{"ability": "identity", "pass": True, "expect": ["Alice"], "answer": "I am Alice.",
                "identity_taken": True, "degenerate": False},
               {"ability": "abstention", "pass": False, "expect": [], "answer": "Rex", "identity_taken": False,
                "degenerate": False}]
    summary = summarize(records)
    assert summary["abilities"] == {"abstention": [0, 1], "identity": [1, 1]}
    assert summary["passed"] == [1, 2] and summary["identity_taken"] == [1, 1]


def test_locomo_questions_become_first_person(tmp_path: Path) -> None:
    assert first_person("What is Caroline's favourite book?", "Caroline") == "What is my favourite book?"
    assert first_person("What does Caroline do to relax?", "Caroline") == "What do I do to relax?"
    assert first_person("Who inspired Caroline to paint?", "Caroline") == "Who inspired me to paint?"
    assert first_person("Why did Caroline quit her job?", "Caroline Ng") == "Why did I quit my job?"
    assert content_words("The adoption agencies") == ("adoption", "agencies")
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(LOCOMO))
    sessions, cases = load_locomo(path, "a")
    assert sessions == [["Hi Tomas! I just adopted a ferret called Nutmeg."],
                        ["My sister Imke is visiting from Bremen."]]
    assert [c.query for c in cases] == ["What is my ferret called?", "Where is my sister visiting from?"]
    assert cases[1].evidence == ("My sister Imke is visiting from Bremen.",) and cases[1].expect == ("bremen",)
    other_sessions, other = load_locomo(path, "b")
    assert [c.query for c in other] == ["Where did I go hiking?"] and len(other_sessions) == 2
    with pytest.raises(ValueError, match="speaker"):
        load_locomo(path, "c")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        load_locomo(tmp_path / "broken.json", "a")


@pytest.mark.parametrize("mode", ["abilities", "locomo"])
def test_bench_abilities_end_to_end(mode: str, tiny_models: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "abilities"
    source.mkdir()
    (source / "unrelated.jsonl").write_text(json.dumps({"prompt": "Tell me about the sea."}) + "\n")
    if mode == "locomo":
        conversation = tmp_path / "conv.json"
        conversation.write_text(json.dumps(LOCOMO))
        args = ["--locomo", str(conversation), "--speaker", "a", "--abilities", str(source)]
    else:
        (source / "identity.jsonl").write_text(json.dumps(
            {"name": "name", "teach": ["My name is Alice."], "query": "What is my name?", "expect": ["Alice"]}) + "\n")
        (source / "correction.jsonl").write_text(json.dumps(
            {"name": "city", "sessions": [["I live in Porto."], ["I live in Ghent now."]], "query": "Where do I live?",
             "expect": ["Ghent"], "reject": ["Porto"], "distractors": 1}) + "\n")
        args = ["--abilities", str(source)]
    out = tmp_path / "out"
    code = bench_main([*args, "--backend", "torch", "--model", str(tiny_models["llama"]), "--out", str(out),
                       "--max-tokens", "4", "--reply-tokens", "2", "--no-progress",
                       "--mm-opt", "trace_bank.write_gate=all"])
    assert code == 0
    stdout = capsys.readouterr().out
    results = json.loads(next(out.glob(f"{mode}_torch_*.json")).read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == (["none", "trace_bank", "oracle"] if mode == "locomo" else
                     ["none", "trace_bank", "in-context", "oracle"])
    bank = results["rows"][1]
    assert bank["crowded"]["state_bytes"] > 0 and len(bank["crowded"]["cases"]) == results["n_cases"]
    assert ("separate" in bank) == (mode == "abilities")
    assert "| trace_bank | one for all |" in stdout
    probe = bank["crowded"]["unrelated"]  # with the whole conversation in memory, for LoCoMo
    assert len(probe) == 1 and {"identical", "degenerate"} <= set(probe[0])


def test_bench_abilities_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench_main(["--locomo", str(tmp_path / "missing.json"), "--no-progress"]) == 2
    assert "lmm.bench: error:" in capsys.readouterr().err


def test_scale_facts_are_distinct_and_seeded() -> None:
    from lmm.bench.scale import generate_facts

    facts = generate_facts(400, seed=3)
    assert facts == generate_facts(400, seed=3) and facts != generate_facts(400, seed=4)
    assert len({f.answer for f in facts}) == 400 and len({f.question for f in facts}) == 400
    assert all(f.answer in f.statement and f.answer not in f.question for f in facts)


def test_bench_scale_end_to_end(tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = bench_main(["--scale", "3,6", "--backend", "torch", "--model", str(tiny_models["llama"]), "--out", str(out),
                       "--max-tokens", "3", "--no-progress", "--mm-opt", "trace_bank.write_gate=all"])
    assert code == 0
    results = json.loads(next(out.glob("scale_torch_*.json")).read_text())
    assert [r["n"] for r in results["rows"]] == [3, 6] and [r["traces"] for r in results["rows"]] == [3, 6]
    assert all(r["bytes_per_fact"] > 0 and r["write_ms_median"] > 0 and r["index_ms_median"] > 0
               for r in results["rows"])
    assert next(out.glob("scale_torch_*.png")).stat().st_size > 1000
    assert sorted(p.name for p in next(out.glob("scale_states_*")).iterdir()) == ["3.safetensors", "6.safetensors"]
    assert "| 6 |" in capsys.readouterr().out
    assert bench_main(["--scale", "ten", "--no-progress"]) == 2
