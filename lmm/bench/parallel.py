"""The benchmark's rows in parallel worker processes (`python -m lmm.bench --jobs N`).

Owns splitting one run's rows over N spawned processes, each of which loads its own backend once
and runs the rows it is handed with `BenchRunner.run_rows`, and merging what they return into the
same results as a one-process run. Every row is computed from fresh engines and the plain model's
probes are deterministic, so answers, probe replies and recall/locality/fluency figures do not
depend on how rows are split (each worker computes the plain model's probes once, and they must
agree); speed figures do (the rows share the cores), which is why the tokens/s ratio is paired
within a row. It owns no row logic (`lmm.bench.runner`).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from lmm.bench.runner import REFERENCE_ROWS, BenchConfig, BenchRunner

_RUNNER: BenchRunner | None = None  # one per worker process


def default_jobs() -> int:
    """One worker per core the process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity mask
        return os.cpu_count() or 1


def _start_worker(config: BenchConfig) -> None:
    global _RUNNER
    from lmm.bench.engines import load_shared_backend

    _RUNNER = BenchRunner(config, load_shared_backend(config.backend, config.model, config.threads))


def _run_row(name: str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    if _RUNNER is None:
        raise RuntimeError("the benchmark worker was not started")
    return _RUNNER.run_rows([name])[0], _RUNNER.plain_probes(), _RUNNER.backend_meta()


def run_parallel(planner: BenchRunner, jobs: int, on_row: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every row of `planner` (a runner with no backend: it runs nothing here), over `jobs` worker
    processes; the results of `BenchRunner.run`."""
    start = time.perf_counter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    config = planner.config
    names = planner.row_names()
    # Module rows first, the cheap reference rows last, so that no long row starts at the end.
    names = [n for n in names if n not in REFERENCE_ROWS] + [n for n in names if n in REFERENCE_ROWS]
    rows, plain, meta = [], None, {}
    context = multiprocessing.get_context("spawn")  # torch and mlx thread pools do not survive a fork
    with context.Pool(min(jobs, len(names)), initializer=_start_worker, initargs=(config,)) as pool:
        for row, probes, backend_meta in pool.imap_unordered(_run_row, names, chunksize=1):
            if plain is None:
                plain, meta = probes, backend_meta
            elif [p["tokens"] for p in probes] != [p["tokens"] for p in plain]:
                raise RuntimeError("the workers' plain models disagree: their probe replies differ")
            rows.append(row)
            on_row(row)
    return planner.results(rows, plain or [], started_at, time.perf_counter() - start, meta=meta, jobs=jobs)
