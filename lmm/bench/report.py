"""Benchmark output: the rich table, the JSON files and the PNG chart.

Owns how results (from `lmm.bench.runner`) are shown and stored, and the verdict flags:

* ``fluency``: a module row whose fluency is more than `FLUENCY_DROP` below the `none`
  row's (the plain model through the same pipeline; 1.0 when there is no `none` row).
* ``locality``: a module row whose probe replies are identical to the plain model's for
  fewer than `LOCALITY_MIN` of the probes.

A flagged row keeps its recall figure but the table marks it (its verdict column and a
``*`` on recall) and the chart labels it, because recall from a collapsed model ("Alice
Alice Alice ...") is not recall. Reference rows are never flagged: `in-context` changes
probe replies by design (they are asked after a chat history).
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

FLUENCY_DROP = 0.15
LOCALITY_MIN = 0.5


def _reference_fluency(results: dict[str, Any]) -> float:
    for row in results.get("rows", []):
        if row["name"] == "none" and row["summary"].get("fluency") is not None:
            return float(row["summary"]["fluency"])
    return 1.0


def row_flags(row: dict[str, Any], reference_fluency: float = 1.0) -> list[str]:
    """Why a module row's recall cannot be taken at face value (empty: nothing wrong)."""
    if row.get("kind") == "reference":
        return []
    summary = row["summary"]
    flags = []
    fluency = summary.get("fluency")
    if fluency is not None and fluency < reference_fluency - FLUENCY_DROP:
        flags.append("fluency")
    locality = summary.get("locality")
    if locality is not None and locality < LOCALITY_MIN:
        flags.append("locality")
    return flags


def annotate(results: dict[str, Any]) -> dict[str, Any]:
    """Add `flags` to every row (in place) and return the results."""
    ref = _reference_fluency(results)
    for row in results.get("rows", []):
        row["flags"] = row_flags(row, ref)
    results["flag_rules"] = {
        "fluency": f"fluency below the none row's ({ref:.2f}) by more than {FLUENCY_DROP}",
        "locality": f"fewer than {LOCALITY_MIN:.0%} of probe replies identical to the plain model's",
    }
    return results


# --- table ------------------------------------------------------------------------------------
def _frac(k: int | None, n: int | None) -> str:
    return "–" if k is None or not n else f"{k}/{n}"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _num(x: float | None, fmt: str, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:{fmt}}{suffix}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}B"


COLUMNS = (
    ("row", "left"), ("recall", "right"), ("rec∧fluent", "right"), ("locality", "right"),
    ("tok agree", "right"), ("fluency", "right"), ("loops", "right"), ("tok/s ×plain", "right"), ("TTFT", "right"),
    ("update med/p95", "right"), ("state", "right"), ("load", "right"), ("wall", "right"), ("verdict", "left"),
)


def build_table(results: dict[str, Any]) -> Table:
    annotate(results)
    lifelong = results.get("kind") == "lifelong"
    title = (f"{'Lifelong memory' if lifelong else 'Memory'} benchmark — {results['model_id']} on "
             f"{results['backend']}, layer {results['layer']}, {results['n_scenarios']} scenarios "
             f"({Path(results['scenarios_file']).name}), {results['n_probes']} probes")
    table = Table(title=title, title_justify="left", show_lines=False, pad_edge=False)
    for header, justify in COLUMNS:
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in results["rows"]:
        s = row["summary"]
        flags = row.get("flags", [])
        update = ("–" if s["update_median"] is None
                  else f"{s['update_median']:.2f}/{s['update_p95']:.2f}s")
        if row["kind"] == "reference":
            verdict = "[dim]reference[/dim]"
        elif flags:
            verdict = "[bold red]✗ " + ", ".join(flags) + "[/bold red]"
        else:
            verdict = "[green]ok[/green]"
        name = row["name"]
        if row["kind"] == "reference":
            name += " (identity)" if name == "none" else " (history)"
        table.add_row(
            name, _frac(s["recalled"], s["n"]) + ("*" if flags else ""), _frac(s["recall_fluent"], s["n"]),
            _share(s["locality"]), _num(s["token_agreement"], ".2f"), _share(s["fluency"]),
            _share(s.get("loops")), _num(s["tps_ratio"], ".2f", "×"), _num(s["ttft_median"], ".2f", "s"), update,
            _bytes(s["state_bytes_median"]),
            _num(s["load_median"] * 1000 if s["load_median"] is not None else None, ".1f", "ms"),
            _num(s["wall_seconds"], ".0f", "s"), verdict,
        )
    plain = results.get("plain", {})
    dropped = [f"{r['name']}: {r['history_dropped_messages']}" for r in results["rows"]
               if r.get("history_dropped_messages")]
    dropped += [f"{r['name']}/{s['name']}: {s['history_dropped_messages']}" for r in results["rows"]
                for s in r.get("scenarios", []) if s.get("history_dropped_messages")]
    threads = results.get("torch_threads")
    notes = [
        f"plain model: {_num(plain.get('probe_tps'), '.1f')} tok/s on the probes, TTFT "
        f"{_num(plain.get('ttft_median'), '.2f', 's')}"
        + (f", torch threads {threads}" if threads else "")
        + (f", rows over {results['jobs']} processes" if results.get("jobs", 1) > 1 else "")
        + f"; run wall time {_num(results.get('wall_seconds'), '.0f', 's')}",
        "recall: answers naming the fact after a restart; rec∧fluent: ... by a non-degenerate answer",
        "locality: probe replies identical to the plain model's; tok agree: mean token agreement; "
        + results.get("locality_pairing", ""),
        "fluency: recall + probe answers not degenerate; loops: answers with a repeated sentence or 4-gram; "
        "tok/s ×plain: decoding speed vs the plain model, "
        "same prompts, timed alternately; TTFT, load: medians",
        "* recall of a flagged row: " + "; ".join(results.get("flag_rules", {}).values()),
    ]
    if dropped:
        notes.append("context window full, oldest messages dropped: " + ", ".join(dropped))
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def print_table(results: dict[str, Any], console: Console | None = None) -> None:
    if console is None:
        probe = Console()
        console = probe if probe.is_terminal else Console(width=200)
    console.print(build_table(results))


def table_text(results: dict[str, Any], width: int = 200) -> str:
    """The table as plain text (for tests and logs)."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(build_table(results))
    return console.export_text()


# --- files ------------------------------------------------------------------------------------
def output_names(results: dict[str, Any], stamp: str) -> tuple[str, str]:
    prefix = "lifelong" if results.get("kind") == "lifelong" else "bench"
    latest = f"latest_{results['backend']}" if prefix == "bench" else f"latest_lifelong_{results['backend']}"
    return f"{prefix}_{results['backend']}_{stamp}", latest


def write_json(results: dict[str, Any], out_dir: Path, stamp: str | None = None) -> tuple[Path, Path]:
    """`bench_<backend>_<timestamp>.json` and `latest_<backend>.json` (lifelong: `lifelong_…`)."""
    annotate(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name, latest = output_names(results, stamp or time.strftime("%Y%m%d_%H%M%S"))
    text = json.dumps(results, indent=1, ensure_ascii=False)
    path, latest_path = out_dir / f"{name}.json", out_dir / f"{latest}.json"
    path.write_text(text, encoding="utf-8")
    latest_path.write_text(text, encoding="utf-8")
    return path, latest_path


def write_chart(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars: recall, locality and fluency per row; flagged rows are labelled in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    annotate(results)
    rows = results["rows"]
    metrics = (("recall", "recall", "#4c72b0"), ("locality", "locality (identical)", "#55a868"),
               ("fluency", "fluency", "#dd8452"))
    width = 0.26
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) + 2), 4.2), dpi=110)
    for m, (key, label, color) in enumerate(metrics):
        xs = [i + (m - 1) * width for i in range(len(rows))]
        values = [row["summary"].get(key) or 0.0 for row in rows]
        bars = ax.bar(xs, values, width, label=label, color=color)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(rows)))
    labels = [row["name"] + ("\n(!) " + ", ".join(row["flags"]) if row.get("flags") else "") for row in rows]
    ax.set_xticklabels(labels, fontsize=8)
    for tick, row in zip(ax.get_xticklabels(), rows, strict=True):
        if row.get("flags"):
            tick.set_color("#c0392b")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share")
    kind = "lifelong" if results.get("kind") == "lifelong" else "recall"
    ax.set_title(f"lmm {kind} benchmark: {results['model_id']} / {results['backend']}, "
                 f"{results['n_scenarios']} scenarios", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3, bbox_to_anchor=(0.5, -0.16) if len(rows) > 6 else None)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(results: dict[str, Any], out_dir: Path, stamp: str | None = None) -> dict[str, Path]:
    """JSON (timestamped + latest) and PNG (timestamped + latest) under `out_dir`."""
    stamp = stamp or time.strftime("%Y%m%d_%H%M%S")
    json_path, latest_json = write_json(results, out_dir, stamp)
    name, latest = output_names(results, stamp)
    png = write_chart(results, Path(out_dir) / f"{name}.png")
    latest_png = Path(out_dir) / f"{latest}.png"
    latest_png.write_bytes(png.read_bytes())
    return {"json": json_path, "latest_json": latest_json, "png": png, "latest_png": latest_png}
