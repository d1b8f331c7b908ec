"""The benchmark runner, report and smoke script end to end on a tiny random model (torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmm.bench.__main__ import main as bench_main
from lmm.bench.engines import parse_module_options
from lmm.bench.records import summarize_row
from lmm.bench.report import row_flags, table_text, write_json
from lmm.bench.runner import BenchConfig, BenchRunner

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = [
    {"name": "user_name", "teach": ["My name is Alice."], "distractors": 1,
     "query": "What is my name?", "expect": ["Alice"]},
    {"name": "cat_name", "teach": ["My cat is called Pepper."], "distractors": ["Why is the sky blue?"],
     "query": "What is my cat called?", "expect": ["Pepper"]},
]
PROBES = ["Hello! How are you today?", "What is the sun?"]


def _write_inputs(tmp_path: Path) -> dict[str, Path]:
    scenarios = tmp_path / "scenarios.jsonl"
    scenarios.write_text("\n".join(json.dumps(s) for s in SCENARIOS) + "\n")
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps({"prompt": p}) for p in PROBES) + "\n")
    distractors = tmp_path / "distractors.jsonl"
    distractors.write_text(json.dumps({"text": "Tell me about the sea."}) + "\n")
    return {"scenarios": scenarios, "probes": probes, "distractors": distractors}


def _in_unit(x: float | None) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def test_bench_end_to_end(tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = _write_inputs(tmp_path)
    out = tmp_path / "out"
    code = bench_main([
        "--backend", "torch", "--model", str(tiny_models["llama"]), "--modules", "identity,lora_on_user",
        "--scenarios", str(files["scenarios"]), "--probes", str(files["probes"]),
        "--distractors", str(files["distractors"]), "--out", str(out), "--max-tokens", "5", "--reply-tokens", "3",
        "--mm-opt", "lora_on_user.lr=0.01", "--no-progress", "--jobs", "1",
    ])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "lora_on_user" in stdout and "in-context" in stdout

    results = json.loads((out / "latest_torch.json").read_text())
    stamped = sorted(out.glob("bench_torch_*.json"))
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == results
    assert sorted(out.glob("bench_torch_*.png")) and (out / "latest_torch.png").stat().st_size > 1000
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == ["none", "lora_on_user", "in-context"]  # identity is the `none` row
    assert rows["lora_on_user"]["options"] == {"lr": "0.01"}
    assert results["n_scenarios"] == 2 and results["n_probes"] == 2 and len(results["plain"]["probes"]) == 2
    for row in rows.values():
        s = row["summary"]
        assert s["n"] == 2 and len(row["scenarios"]) == 2 and len(row["probes"]) == 2
        for key in ("recall", "locality", "token_agreement", "fluency"):
            assert _in_unit(s[key]), (row["name"], key, s[key])
        assert s["n_answers"] == 4 and s["tps_ratio"] > 0 and s["ttft_median"] >= 0
        assert s["wall_seconds"] > 0
        for sc in row["scenarios"]:
            assert isinstance(sc["answer"], str) and sc["recalled"] in (True, False)
    # teach + distractor turns, each with a reply and (for learning rows) an update
    lora = rows["lora_on_user"]
    assert [len(sc["turns"]) for sc in lora["scenarios"]] == [2, 2]
    assert lora["summary"]["n_updates"] == 4 and lora["summary"]["update_p95"] >= lora["summary"]["update_median"]
    assert lora["summary"]["state_bytes_median"] > rows["none"]["summary"]["state_bytes_median"] > 0
    assert lora["summary"]["load_median"] > 0
    assert rows["in-context"]["summary"]["n_updates"] == 0 and rows["in-context"]["summary"]["state_bytes_max"] is None
    # the identity hook is transparent: the none row's probe replies equal the plain model's
    assert rows["none"]["summary"]["locality"] == 1.0
    assert results["wall_seconds"] > 0 and "flags" in rows["lora_on_user"]


def _outputs(results: dict) -> dict:
    """Everything a run generated, by row: session-1 replies, answers, probe replies (token ids)."""
    def replies(sc: dict) -> list[str]:
        return [t["assistant"] for t in sc.get("turns", [])] + [sc["answer"]]

    return {"plain": [p["tokens"] for p in results["plain"]["probes"]],
            **{row["name"]: ([replies(sc) for sc in row["scenarios"]], [p["tokens"] for p in row["probes"]])
               for row in results["rows"]}}


def test_rows_in_worker_processes_match_one_process(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """`--jobs 2` splits the rows over two spawned processes: every reply, answer and probe reply is the
    one-process run's, rows in the same order. Positive control: shorter session-1 replies differ."""
    files = _write_inputs(tmp_path)

    def run(jobs: int, *extra: str) -> dict:
        out = tmp_path / f"out{jobs}{len(extra)}"
        assert bench_main([
            "--backend", "torch", "--model", str(tiny_models["qwen3"]), "--modules", "identity,lora_on_user",
            "--scenarios", str(files["scenarios"]), "--probes", str(files["probes"]),
            "--distractors", str(files["distractors"]), "--out", str(out), "--max-tokens", "5",
            "--reply-tokens", "3", "--mm-opt", "lora_on_user.lr=0.05", "--no-progress", "--jobs", str(jobs), *extra,
        ]) == 0
        return json.loads((out / "latest_torch.json").read_text())

    one, two = run(1), run(2)
    assert two["jobs"] == 2 and one["jobs"] == 1
    assert [r["name"] for r in two["rows"]] == [r["name"] for r in one["rows"]] == ["none", "lora_on_user",
                                                                                    "in-context"]
    assert _outputs(two) == _outputs(one)
    assert two["backend"] == "torch" and two["layer"] == one["layer"] and two["torch_threads"] == 1
    assert _outputs(run(1, "--reply-tokens", "1")) != _outputs(one)  # the comparison sees a change


def _collapsed_row() -> dict:
    probe_tokens = [5, 6, 7, 8]
    return {
        "name": "collapsed", "kind": "module", "module": "fake",
        "scenarios": [{"name": f"s{i}", "expect": ["Alice"], "answer": "Alice Alice Alice Alice Alice Alice Alice",
                       "ttft": 0.1, "generation_tokens": 7, "generation_seconds": 0.1} for i in range(3)],
        "probes": [{"prompt": "What is 7 times 8?", "answer": "Alice Alice Alice Alice Alice Alice", "tokens": [1] * 6,
                    "baseline": "7 times 8 is 56.", "identical": False,
                    "agreement": 0.0, "ttft": 0.1, "generation_tokens": 6, "generation_seconds": 0.1}
                   for _ in probe_tokens],
        "load_seconds": [0.001], "state_bytes": [100], "wall_seconds": 1.0,
    }


def _healthy_none_row() -> dict:
    return {
        "name": "none", "kind": "reference", "module": "identity",
        "scenarios": [{"name": f"s{i}", "expect": ["Alice"], "answer": "I do not know your name yet.",
                       "ttft": 0.1, "generation_tokens": 7, "generation_seconds": 0.1} for i in range(3)],
        "probes": [{"prompt": "What is 7 times 8?", "answer": "7 times 8 is 56.", "tokens": [5, 6], "baseline": "",
                    "identical": True, "agreement": 1.0, "ttft": 0.1, "generation_tokens": 2,
                    "generation_seconds": 0.05}],
        "load_seconds": [0.001], "state_bytes": [50], "wall_seconds": 1.0,
    }


def test_report_flags_a_collapsed_row(tmp_path: Path) -> None:
    collapsed, none = _collapsed_row(), _healthy_none_row()
    for row in (collapsed, none):
        summarize_row(row, plain_tps=50.0)
    s = collapsed["summary"]
    assert s["recall"] == 1.0  # it scores on recall ...
    assert s["recall_fluent"] == 0 and s["fluency"] == 0.0 and s["locality"] == 0.0  # ... and fails the rest
    assert row_flags(collapsed, none["summary"]["fluency"]) == ["fluency", "locality"]
    assert row_flags(none) == []

    results = {"kind": "recall", "backend": "torch", "model_id": "fake", "layer": 1, "n_scenarios": 3,
               "n_probes": 4, "scenarios_file": "x.jsonl", "rows": [none, collapsed], "wall_seconds": 2.0}
    text = table_text(results)
    line = next(ln for ln in text.splitlines() if "collapsed" in ln)
    assert "3/3" in line and "*" in line and "✗ fluency, locality" in line
    none_line = next(ln for ln in text.splitlines() if ln.strip("│ ").startswith("none"))
    assert "✗" not in none_line
    path, _ = write_json(results, tmp_path, stamp="test")
    saved = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    assert saved["collapsed"]["flags"] == ["fluency", "locality"] and saved["none"]["flags"] == []


def test_options_and_sessions(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    assert parse_module_options(["lora_on_user.lr=0.1", "lora_on_user.rank=4"], scoped=True) == {
        "lora_on_user": {"lr": "0.1", "rank": "4"}}
    assert parse_module_options(["lr=0.1"], scoped=False) == {"lr": "0.1"}
    with pytest.raises(ValueError, match="module.key=value"):
        parse_module_options(["lr=0.1"], scoped=True)
    with pytest.raises(ValueError, match="unknown memory module"):
        parse_module_options(["nosuch.lr=0.1"], scoped=True)
    files = _write_inputs(tmp_path)
    lines = [json.dumps({**SCENARIOS[0], "name": f"s{i}", "distractors": 0}) for i in range(7)]
    files["scenarios"].write_text("\n".join(lines))
    config = BenchConfig(scenarios=files["scenarios"], probes=files["probes"], distractors=files["distractors"],
                         lifelong=True, sessions=3, modules=["lora_on_user"])
    runner = BenchRunner(config, backend=None)  # type: ignore[arg-type]  # nothing is run
    assert [len(s) for s in runner.sessions()] == [3, 2, 2]
    assert runner.row_names() == ["none", "lora_on_user", "in-context"]
    with pytest.raises(ValueError, match="unknown option"):
        BenchRunner(BenchConfig(scenarios=files["scenarios"], probes=files["probes"],
                                module_options={"lora_on_user": {"nosuch": "1"}}), backend=None)  # type: ignore[arg-type]


def test_smoke_script_on_tiny_model(tiny_models: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "memorization_smoke.py"), "--backend", "torch",
         "--model", str(tiny_models["llama"]), "--names", "Alice,Bob", "--memory", "lora_on_user",
         "--mm-opt", "lr=0.01", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith(("PASS Alice", "FAIL Alice")) for ln in lines) == 1
    assert sum(ln.startswith(("PASS Bob", "FAIL Bob")) for ln in lines) == 1
    rate = next(ln for ln in lines if ln.startswith("Success rate:"))
    assert rate.endswith("/2") and "Fluent answers:" in proc.stdout


def test_lifelong_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    files = _write_inputs(tmp_path)
    out = tmp_path / "out"
    code = bench_main([
        "--backend", "torch", "--model", str(tiny_models["llama"]), "--modules", "lora_on_user", "--lifelong",
        "--sessions", "2", "--scenarios", str(files["scenarios"]), "--probes", str(files["probes"]),
        "--distractors", str(files["distractors"]), "--out", str(out), "--max-tokens", "4", "--reply-tokens", "3",
        "--no-progress",
    ])
    assert code == 0
    results = json.loads((out / "latest_lifelong_torch.json").read_text())
    assert results["kind"] == "lifelong" and (out / "latest_lifelong_torch.png").exists()
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == ["none", "lora_on_user", "in-context"]
    lora = rows["lora_on_user"]
    assert lora["sessions"] == [1, 1] and len(lora["turns"]) == 4 and len(lora["state_bytes"]) == 2
    assert len(lora["load_seconds"]) == 2  # loaded at the start of session 2 and for the queries
    assert {t["session"] for t in lora["turns"]} == {0, 1}
    for row in rows.values():
        assert row["summary"]["n"] == 2 and _in_unit(row["summary"]["recall"]) and _in_unit(row["summary"]["fluency"])
