"""Benchmark records: one reply, one chat turn, one answer, one probe, and a row's summary figures.

Owns the JSON shape of what `lmm.bench.runner` measures and how a row's raw records become the
figures the table shows (recall, locality, fluency, speed, state size). It runs no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmm.bench.metrics import has_loop, is_degenerate, median, p95, recalls, token_agreement
from lmm.engine import TurnResult


def generation_seconds(turn: TurnResult) -> float:
    return turn.generation_tokens / turn.tokens_per_second if turn.tokens_per_second else 0.0


def turn_record(turn: TurnResult) -> dict[str, Any]:
    update = turn.update
    learned = update is not None and update.skipped != "incognito"
    return {
        "user": turn.user, "assistant": turn.assistant, "generation_tokens": turn.generation_tokens,
        "generation_seconds": generation_seconds(turn),
        "ttft": turn.time_to_first_token,
        "update_seconds": update.seconds if learned else None,
        "n_selected": len(update.selected_tokens) if update is not None else 0,
        "update_skipped": update.skipped if update is not None else None,
        # consolidation: per statement, the questions learned, drift, whether it was undone, seconds
        "consolidated": [{k: c[k] for k in ("statement", "examples", "loss", "loss_after", "drift", "rolled_back",
                                            "seconds")} for c in update.consolidated] if update is not None else [],
    }


def answer_record(turn: TurnResult) -> dict[str, Any]:
    return {"answer": turn.assistant, "generation_tokens": turn.generation_tokens,
            "generation_seconds": generation_seconds(turn),
            "ttft": turn.time_to_first_token}


def probe_record(prompt: str, source: str | None, reply: TurnResult, baseline: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": prompt, "memory_from": source, "answer": reply.assistant, "tokens": reply.tokens,
        "baseline": baseline["answer"], "identical": reply.tokens == baseline["tokens"],
        "agreement": token_agreement(reply.tokens, baseline["tokens"]),
        "generation_tokens": reply.generation_tokens, "generation_seconds": generation_seconds(reply),
        "ttft": reply.time_to_first_token,
    }


# --- summary figures ------------------------------------------------------------------------
def nan_to_none(x: float) -> float | None:
    return None if x != x else x


def tokens_per_second(items: Sequence[dict[str, Any]]) -> float | None:
    tokens = sum(i.get("generation_tokens", 0) for i in items)
    seconds = sum(i.get("generation_seconds", 0.0) for i in items)
    return tokens / seconds if seconds > 0 else None


def summarize_row(row: dict[str, Any], plain_tps: float | None = None) -> dict[str, Any]:
    """Compute a row's figures from its raw records (answers, probes, turns, timings) in place."""
    scen = row.get("scenarios", [])
    probes = row.get("probes", [])
    for s in scen:
        s["recalled"] = recalls(s["answer"], s["expect"])
        s["degenerate"] = is_degenerate(s["answer"])
        s["loop"] = has_loop(s["answer"])
    for p in probes:
        p["degenerate"] = is_degenerate(p["answer"])
        p["loop"] = has_loop(p["answer"])
    n = len(scen)
    k = sum(s["recalled"] for s in scen)
    answers = [s["degenerate"] for s in scen] + [p["degenerate"] for p in probes]
    turns = [t for s in scen for t in s.get("turns", [])] + row.get("turns", [])
    updates = [t["update_seconds"] for t in turns if t.get("update_seconds") is not None]
    ttfts = [a["ttft"] for a in scen + probes if a.get("ttft") is not None]
    loads = row.get("load_seconds", [])
    sizes = row.get("state_bytes", [])
    probe_tps = tokens_per_second(probes)
    paired = [p for p in probes if p.get("paired_plain")]
    if paired:  # the same prompts, plain model timed right before: robust to a changing machine load
        plain_tps = tokens_per_second([p["paired_plain"] for p in paired])
        ratio_tps = tokens_per_second(paired)
    else:
        ratio_tps = probe_tps
    row["summary"] = {
        "n": n,
        "recalled": k,
        "recall": k / n if n else None,
        "recall_fluent": sum(s["recalled"] and not s["degenerate"] for s in scen),
        "n_probes": len(probes),
        "locality": sum(p["identical"] for p in probes) / len(probes) if probes else None,
        "token_agreement": sum(p["agreement"] for p in probes) / len(probes) if probes else None,
        "n_answers": len(answers),
        "fluent": sum(not d for d in answers),
        "fluency": sum(not d for d in answers) / len(answers) if answers else None,
        "loops": sum(a["loop"] for a in scen + probes) / len(answers) if answers else None,
        "probe_tps": probe_tps,
        "answer_tps": tokens_per_second(scen + probes),
        "tps_ratio": ratio_tps / plain_tps if ratio_tps and plain_tps else None,
        "tps_ratio_pairs": len(paired),
        "ttft_median": nan_to_none(median(ttfts)),
        "update_median": nan_to_none(median(updates)),
        "update_p95": nan_to_none(p95(updates)),
        "n_updates": len(updates),
        "state_bytes_median": nan_to_none(median(sizes)),
        "state_bytes_max": max(sizes) if sizes else None,
        "load_median": nan_to_none(median(loads)),
        "wall_seconds": row.get("wall_seconds"),
    }
    consolidated = [c for t in turns for c in t.get("consolidated", [])]
    if consolidated:  # --consolidate rows: statements consolidated, undone by the drift check, seconds each
        row["summary"].update(
            consolidated=len(consolidated), consolidation_undone=sum(c["rolled_back"] for c in consolidated),
            consolidation_no_question=sum(not c["examples"] for c in consolidated),
            consolidation_seconds_median=nan_to_none(median([c["seconds"] for c in consolidated])))
    return row["summary"]
