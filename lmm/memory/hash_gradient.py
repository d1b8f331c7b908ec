"""`hash_gradient`: correction rows looked up by a binary hash of the hooked layer's hidden state.

Conceptually a `2^bits x d` table of corrections added to the hidden state; only the rows
that were written are stored (sorted int64 `keys`, float32 `rows` [n, d]), so `bits=24`
costs memory in proportion to what was learned. The hash normalises a hidden state,
subtracts a calibrated mean direction, projects it with a fixed seeded Gaussian `proj`
[d, bits] and takes the sign bits. `rewrite` adds `scale * row[code]` at every position
whose code (or, with `radius > 0`, the nearest written code within that Hamming distance)
is in the table; with no rows it returns its input untouched. Learning: the position that
predicts each selected token has its row (a new row starts at zero) trained by `steps`
optimizer steps on the selected tokens' loss, then written back; past `max_rows` the
least recently written rows are evicted.

Calibration: mid-layer hidden states share a strong common direction, so raw sign bits
are unbalanced. Measured on SmolLM2-135M-Instruct, layer 15, 307 tokens of 8 chat
prompts: mean minority-bit fraction 0.24 (one bit constant) without centring, 0.45 after
subtracting the mean of the normalised states; the mean of one prompt is already close
(cos 0.95 to the mean of all eight). So the module accumulates the mean direction (and
the typical hidden norm, a geometric mean that the attention-sink token, ~150x the median
norm there, barely moves) over the passes it sees while its table is empty, and freezes
both when the first row is written: moving them later would re-key every written row.
`scale` (typical norm / sqrt(d)) makes rows dimensionless: a coordinate of 1 is a typical
coordinate, so `steps` Adam steps of `lr` change the hidden state by at most ~steps * lr of
its norm, on models of any width and norm. Both are saved with the table.

Known limit: the first content token of a message is predicted from the chat template's
scaffolding (e.g. the newline after `<|im_start|>user`), whose hidden state is the same in
every chat with the same prefix. Its row is therefore read at that position in every later
chat: on SmolLM2 it is what changes unrelated replies (2 of 10 probes after one taught
message; 0 of 10 when such positions are not written). `LearnBatch` does not say which
positions are the user's own text, so the module cannot skip them yet.

With `--consolidate`, each statement gets tables of its own instead, opened by its fact gate
(`lmm.memory.fact_gate`): `fact_tables` tables, the first keyed by the first `fact_bits` bits of the
same codes, the others by the same calibrated hash through projections of their own (seeded by the
saved `fact_seed`); each position reads, in every table, the nearest row within Hamming radius
`fact_radius`, and adds their mean scaled by `fact_scale`. An update trains the rows nearest the codes
that predict the teacher's answer, and adds a zero row for a code with none within the radius; at the
default radius (the full 16 bits) only the first update adds rows, one per position of the first
answer, and every position of a reply the gate opens reads the most similar of them. With one table,
which row a reply's position happened to hash to decided whether the value came out whole; several
tables average that luck out. The gate, not the code, keeps other replies alone. Beside the teacher's
answers, the rows also learn the statement's own surprising tokens said as the user's turn
(`fact_statement_weight`): a reply often restates the user's words ("My dog is ..."), and those rows then
carry the value. The shared table's exact rows rarely fired on a question in other words, coarser
shared codes reached unrelated replies, and coarse 8-bit fact rows within radius 2 carried the subject
but often not the value (docs/consolidation.md).

It owns no token selection (shared, `lmm.memory.base`) and no model code. The optimizer
moments are reset at every update: the rows trained change from one message to the next.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmm.memory.base import GradientMemory, LearnBatch, LearnResult, RewriteContext, StateError
from lmm.memory.fact_gate import FactGate, FactGateConfig
from lmm.memory.registry import register
from lmm.ops import Array, Ops, Params

MAX_RADIUS = 3  # codes within radius r: sum of C(bits, i), i <= r; 2325 lookups per position at bits=24
MAX_FACT_TABLES = 8
CALIBRATION_TOKENS = 4096  # the running mean is ample by then; stop paying the host copy


@dataclass
class HashGradientConfig(FactGateConfig):
    # 5 Adam steps of 0.03 move a correction by up to ~15% of the hidden norm. On SmolLM2-135M
    # (torch, 8 generic user messages, 5 unrelated probes) lr 0.01 / 0.03 / 0.1 gave selected-token
    # CE 8.0 -> 5.7 / 2.6 / 0.2 and changed 0 / 1 / 2 of 5 probe replies.
    lr: float = 3e-2
    steps: int = 5
    bits: int = 16
    radius: int = 0  # Hamming radius of the lookup: 0 reads exact codes only
    max_rows: int = 16384  # 0: unbounded
    center: bool = True  # subtract the calibrated mean direction before hashing
    # A consolidated statement's rows: code bits, lookup radius (fact_bits: each position reads its nearest
    # row), scale relative to the seed rows'. 32 dev facts, one per memory: 16/16/4 recalled 21; 12/12/4 15;
    # 8/2/4 (stop 23-32) 14; 16 bits, new rows past distance 3, 18 (docs/consolidation.md, stop 33).
    fact_bits: int = 16
    fact_radius: int = 16
    fact_scale: float = 4.0
    # Tables per consolidated statement, each hashing with its own projection; a position reads the mean of
    # its nearest row in each. One table's answer hung on which row each position happened to hash to
    # (32 dev facts: 1 table 21 recalled, all in one memory 19; 4 tables 23 and 22; docs/consolidation.md).
    fact_tables: int = 4
    # The statement's own surprising tokens, beside the teacher's answers (32 dev facts: 23 recalled at 1
    # and 0.5, 21 at 0; all 32 in one memory 18 at 1, 15 at 0). The other modules lost 1-2 with it.
    fact_statement_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 8 <= self.bits <= 24:
            raise ValueError(f"bits must be in 8..24, got {self.bits}")
        if not 0 <= self.radius <= MAX_RADIUS:
            raise ValueError(f"radius must be in 0..{MAX_RADIUS}, got {self.radius}")
        if self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0: unbounded), got {self.max_rows}")
        if not 4 <= self.fact_bits <= self.bits:
            raise ValueError(f"fact_bits must be in 4..bits={self.bits}, got {self.fact_bits}")
        if not 0 <= self.fact_radius <= self.fact_bits:
            raise ValueError(f"fact_radius must be in 0..fact_bits={self.fact_bits}, got {self.fact_radius}")
        if not self.fact_scale > 0:
            raise ValueError(f"fact_scale must be > 0, got {self.fact_scale}")
        if not 1 <= self.fact_tables <= MAX_FACT_TABLES:
            raise ValueError(f"fact_tables must be in 1..{MAX_FACT_TABLES}, got {self.fact_tables}")


@dataclass
class _TrainView:
    """The table as the train-phase forward sees it: written keys plus the rows being created."""

    codes: np.ndarray  # codes of batch.hidden, [T]
    keys: np.ndarray  # sorted keys: written ones and new ones
    src: np.ndarray  # per key: row index (>= 0) or -(j + 1) for trained row j of "sel"
    trained: np.ndarray  # indices of the written rows being trained ("sel" rows 0..len-1)
    new_codes: np.ndarray  # codes of the new rows ("sel" rows len(trained)..)


@register
class HashGradientMemory(FactGate, GradientMemory):
    name = "hash_gradient"
    config_cls = HashGradientConfig
    fact_fields = ("rows",)

    def __init__(self, config: HashGradientConfig, *, hidden_size: int, ops: Ops, seed: int) -> None:
        super().__init__(config, hidden_size=hidden_size, ops=ops, seed=seed)
        d, bits = hidden_size, config.bits
        proj = np.random.default_rng(seed).standard_normal((d, bits)).astype(np.float32)
        self.params = {"rows": ops.zeros((0, d))}
        self.buffers = {
            "proj": ops.asarray(proj),
            "keys": ops.asarray(np.zeros(0, np.int64), dtype="int64"),
            "written_at": ops.asarray(np.zeros(0, np.int64), dtype="int64"),
            "center": ops.zeros((d,)),
            "log_norm": ops.zeros((1,)),
            "calib_count": ops.asarray(np.zeros(1, np.int64), dtype="int64"),
            "fact_seed": ops.asarray(np.array([seed], np.int64), dtype="int64"),  # the facts' extra projections
        }
        self._masks = flip_masks(bits, config.radius)
        self._fact_bits = np.int64((1 << config.fact_bits) - 1)
        self._shifts = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
        self._train: _TrainView | None = None
        self._table_proj: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.evicted = 0  # rows dropped by max_rows since this module was created or loaded
        self.init_facts()
        self.reset_session()
        self._after_load()

    # --- host mirrors of the small buffers ------------------------------------------------
    def _after_load(self) -> None:
        cfg: HashGradientConfig = self.config  # type: ignore[assignment]
        d, ops = self.hidden_size, self.ops
        b = {k: ops.to_numpy(v) for k, v in self.buffers.items()}
        rows_shape = tuple(self.params["rows"].shape)
        keys, stamps = b["keys"].astype(np.int64), b["written_at"].astype(np.int64)
        n = keys.shape[0]
        problems = []
        if b["proj"].shape != (d, cfg.bits):
            problems.append(f"proj has shape {b['proj'].shape}, expected {(d, cfg.bits)}")
        if rows_shape != (n, d) or stamps.shape != (n,) or keys.ndim != 1:
            problems.append(f"rows {rows_shape}, keys {keys.shape}, written_at {stamps.shape} do not match")
        if n and (np.any(np.diff(keys) <= 0) or keys[0] < 0 or keys[-1] >= 1 << cfg.bits):
            problems.append(f"keys are not sorted distinct {cfg.bits}-bit codes")
        if b["center"].shape != (d,) or b["log_norm"].shape != (1,) or b["calib_count"].shape != (1,):
            problems.append("calibration tensors have wrong shapes")
        if b["fact_seed"].shape != (1,):
            problems.append("fact_seed has a wrong shape")
        for i in range(self.fact_count):
            for rows_name, keys_name in self._tables(i):
                rows, fkeys = self.params.get(rows_name), self.buffers.get(keys_name)
                if fkeys is None or rows is None or tuple(rows.shape) != (fkeys.shape[0], d):
                    problems.append(f"{rows_name} and {keys_name} do not match")
        if problems:
            raise StateError(f"inconsistent {self.name} state: {'; '.join(problems)}")
        if self.ops.dtype_name(self.params["rows"]) != "float32":
            self.params["rows"] = ops.astype(self.params["rows"], "float32")
        self._keys, self._stamps = keys, stamps
        self._proj = b["proj"].astype(np.float32)
        self._center = b["center"].astype(np.float64)
        self._log_norm = float(b["log_norm"][0])
        self._count = int(b["calib_count"][0])
        self._refresh_calibration()

    def _refresh_calibration(self) -> None:
        cfg: HashGradientConfig = self.config  # type: ignore[assignment]
        center = self._center if cfg.center else np.zeros_like(self._center)
        self._center_proj = (center.astype(np.float32) @ self._proj).astype(np.float32)
        self._table_proj = {}  # the fact tables' projections with their centre's, rebuilt on use
        # Per-coordinate RMS of a typical hidden state: a row coordinate of 1 is a typical coordinate,
        # so Adam's ~lr per coordinate and step moves the correction by ~lr of the hidden norm per step
        # whatever the width (without sqrt(d), lr would act sqrt(d) times more on wide models).
        self.scale = float(np.exp(self._log_norm) / np.sqrt(self.hidden_size)) if self._count else 1.0

    def _resizable(self, name: str) -> bool:
        return name in {"rows", "keys", "written_at"}

    # --- hashing ----------------------------------------------------------------------------
    def _calibrate(self, hidden: Array) -> None:
        """Fold these hidden states into the running mean direction and log-norm (table empty only)."""
        if self._count >= CALIBRATION_TOKENS:
            return
        x = self.ops.to_numpy(hidden).reshape(-1, self.hidden_size).astype(np.float64)
        norms = np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        m = x.shape[0]
        total = self._count + m
        self._center = self._center + ((x / norms[:, None]).sum(0) - m * self._center) / total
        self._log_norm = self._log_norm + (float(np.log(norms).sum()) - m * self._log_norm) / total
        self._count = total
        ops = self.ops
        self.buffers["center"] = ops.asarray(self._center.astype(np.float32))
        self.buffers["log_norm"] = ops.asarray(np.array([self._log_norm], np.float32))
        self.buffers["calib_count"] = ops.asarray(np.array([total], np.int64), dtype="int64")
        # What is saved is float32: hash with exactly that, so a reloaded module hashes alike.
        self._center = self._center.astype(np.float32).astype(np.float64)
        self._log_norm = float(np.float32(self._log_norm))
        self._refresh_calibration()

    def _unit(self, hidden: Array) -> Array:
        ops = self.ops
        h = ops.astype(hidden, "float32")
        return h / ops.maximum(ops.norm(h, axis=-1, keepdims=True), 1e-12)

    def _sign_codes(self, z: np.ndarray) -> np.ndarray:
        """int64 codes from projections [..., bits]: bit b set where z[..., b] > 0."""
        return ((z > 0).astype(np.int64) * self._shifts[: z.shape[-1]]).sum(-1)

    def _hash(self, hidden: Array, unit: Array | None = None) -> np.ndarray:
        """int64 codes of hidden states [..., d] -> [...]: sign bits of (h/|h| - center) @ proj (`unit`:
        h/|h| when the caller has it)."""
        unit = self._unit(hidden) if unit is None else unit
        return self._sign_codes(self.ops.to_numpy(unit @ self.buffers["proj"]) - self._center_proj)

    # --- rewrite ----------------------------------------------------------------------------
    def rewrite(self, hidden: Array, ctx: RewriteContext) -> Array:
        p = self.p
        view = self._train if ctx.phase == "train" and "sel" in p else None
        facts = self.facts_read(ctx)
        if facts:
            hidden = self._fact_rewrite(hidden, facts)
        if view is None:
            if self._keys.shape[0] == 0:
                if ctx.phase != "train" and not self.fact_count:
                    self._calibrate(hidden)
                return hidden
            codes = self._hash(hidden)
            keys, src = self._keys, np.arange(self._keys.shape[0])
        else:
            codes = self._hash(hidden)
            # The pass being trained keeps the scoring pass's codes (a sign bit near zero may flip
            # between the two); any other sequence (a guard prompt) is hashed as it is.
            if codes.shape == (1, view.codes.shape[0]) and np.mean(codes[0] == view.codes) > 0.9:
                codes = view.codes.reshape(1, -1)
            keys, src = view.keys, view.src
        slot = flip_lookup(codes.reshape(-1), keys, self._masks)
        hit = slot >= 0
        if ctx.phase == "generate":
            self.generate_hits += int(hit.sum())
            self.generate_positions += int(hit.size)
        if not hit.any():
            return hidden
        s = np.where(hit, src[np.maximum(slot, 0)], 0)
        used = np.unique(s[hit & (s >= 0)])
        parts = [self.ops.zeros((1, self.hidden_size))]
        if used.size:
            parts.append(self.ops.take(p["rows"], self.ops.asarray(used, dtype="int32"), axis=0))
        local = np.zeros(s.shape, np.int64)
        written = hit & (s >= 0)
        local[written] = 1 + np.searchsorted(used, s[written])
        if view is not None:
            parts.append(p["sel"])
            trained = hit & (s < 0)
            local[trained] = 1 + used.size + (-s[trained] - 1)
        table = self.ops.concat(parts, axis=0)
        idx = self.ops.asarray(local.reshape(codes.shape), dtype="int32")
        delta = self.ops.take(table, idx, axis=0)
        return self.ops.astype(self.ops.astype(hidden, "float32") + delta * self.scale, hidden)

    # --- learning ---------------------------------------------------------------------------
    def learn(self, batch: LearnBatch) -> LearnResult:
        if not batch.positions:
            return LearnResult(steps=0, losses=[], grad_norms={})
        try:
            return super().learn(batch)
        finally:
            self._train = None

    def trainable(self, batch: LearnBatch) -> Params:
        self.optimizer.reset()  # the rows differ from one update to the next
        if self._count == 0:
            self._calibrate(batch.hidden)
        if self._fact is not None:
            return self._fact_trainable(batch)
        codes = self._hash(batch.hidden)
        want = codes[np.asarray(batch.positions, dtype=np.int64)]
        slot = flip_lookup(want, self._keys, self._masks)
        trained = np.unique(slot[slot >= 0])
        new_codes = np.unique(want[slot < 0])
        n, k = self._keys.shape[0], trained.shape[0]
        src = np.arange(n, dtype=np.int64)
        src[trained] = -(np.arange(k, dtype=np.int64) + 1)
        keys = np.concatenate([self._keys, new_codes])
        src = np.concatenate([src, -(k + np.arange(new_codes.shape[0], dtype=np.int64) + 1)])
        order = np.argsort(keys, kind="stable")
        self._train = _TrainView(codes=codes, keys=keys[order], src=src[order], trained=trained,
                                 new_codes=new_codes)
        parts = []
        if k:
            parts.append(self.ops.take(self.params["rows"], self.ops.asarray(trained, dtype="int32"), axis=0))
        if new_codes.shape[0]:
            parts.append(self.ops.zeros((new_codes.shape[0], self.hidden_size)))
        return {"sel": parts[0] if len(parts) == 1 else self.ops.concat(parts, axis=0)}

    def commit(self, params: Params, batch: LearnBatch) -> None:
        if self._fact is not None:
            self.params.update(params)
            return
        view = self._train
        cfg: HashGradientConfig = self.config  # type: ignore[assignment]
        if view is None or self._steps == 0:
            return  # nothing was trained: writing zero rows would only cost memory
        n, k = self._keys.shape[0], view.trained.shape[0]
        stamp = int(self._stamps.max()) + 1 if n else 0
        # Every row of the new table, as an index into concat([rows, sel]).
        source = np.arange(n, dtype=np.int64)
        source[view.trained] = n + np.arange(k, dtype=np.int64)
        keys = np.concatenate([self._keys, view.new_codes])
        source = np.concatenate([source, n + k + np.arange(view.new_codes.shape[0], dtype=np.int64)])
        stamps = np.concatenate([self._stamps, np.full(view.new_codes.shape[0], stamp, np.int64)])
        stamps[view.trained] = stamp
        keep = np.arange(keys.shape[0])
        if cfg.max_rows and keys.shape[0] > cfg.max_rows:
            # newest first, then by key for a deterministic cut among equal stamps
            keep = np.lexsort((keys, -stamps))[: cfg.max_rows]
        keep = keep[np.argsort(keys[keep], kind="stable")]
        table = self.ops.concat([self.params["rows"], params["sel"]], axis=0)
        rows = self.ops.take(table, self.ops.asarray(source[keep], dtype="int32"), axis=0)
        self.ops.evaluate(rows)
        self.evicted += keys.shape[0] - keep.shape[0]
        self.params["rows"] = rows
        self._keys, self._stamps = keys[keep], stamps[keep]
        self.buffers["keys"] = self.ops.asarray(self._keys, dtype="int64")
        self.buffers["written_at"] = self.ops.asarray(self._stamps, dtype="int64")

    # --- consolidated facts (`lmm.memory.fact_gate`): a coarse table per statement --------------
    def seed_trained(self) -> bool:
        return self._keys.shape[0] > 0

    def new_fact(self, i: int, rng: np.random.Generator) -> Params:
        tables = [table_names(i, k) for k in range(self.config.fact_tables)]
        for _, keys_name in tables:
            self.buffers[keys_name] = self.ops.asarray(np.zeros(0, np.int64), dtype="int64")
        return {rows_name: self.ops.zeros((0, self.hidden_size)) for rows_name, _ in tables}

    def _tables(self, i: int) -> list[tuple[str, str]]:
        """(rows, keys) names of fact `i`'s tables: as many as it was created with (states written before
        tables existed hold one)."""
        out = [table_names(i, 0)]
        while table_names(i, len(out))[0] in self.params:
            out.append(table_names(i, len(out)))
        return out

    def _fact_codes(self, hidden: Array, tables: int) -> list[np.ndarray]:
        """Codes of each of a fact's first `tables` tables: the seed table's hash (its first `fact_bits`
        bits) for table 0, the same calibrated hash through each other table's own seeded projection."""
        unit = self._unit(hidden)
        codes = [self._hash(hidden, unit) & self._fact_bits]
        if tables > 1:
            h = self.ops.to_numpy(unit)
            codes += [self._sign_codes(h @ proj - center_proj)
                      for proj, center_proj in map(self._table_projection, range(1, tables))]
        return codes

    def _table_projection(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Table `k`'s projection [d, fact_bits] (seeded by `fact_seed`) and the calibrated centre's image."""
        cached = self._table_proj.get(k)
        if cached is None:
            seed = int(self.ops.to_numpy(self.buffers["fact_seed"])[0])
            shape = (self.hidden_size, self.config.fact_bits)
            proj = np.random.default_rng([seed, k]).standard_normal(shape).astype(np.float32)
            center = self._center if self.config.center else np.zeros_like(self._center)
            cached = self._table_proj[k] = (proj, center.astype(np.float32) @ proj)
        return cached

    def _fact_rewrite(self, hidden: Array, facts: list[int]) -> Array:
        """`hidden` plus, for each open fact, the mean over its tables of the row at each position's code."""
        ops, p = self.ops, self.p
        out = ops.astype(hidden, "float32")
        tables = {i: self._tables(i) for i in facts}
        # A table's codes depend on its index, not on the fact: hashed once for every open fact.
        all_codes = self._fact_codes(hidden, max(len(t) for t in tables.values()))
        for i in facts:
            for (rows_name, keys_name), codes in zip(tables[i], all_codes, strict=False):
                slot = nearest(codes.reshape(-1), ops.to_numpy(self.buffers[keys_name]), self.config.fact_radius)
                if not np.any(slot >= 0):
                    continue
                table = ops.concat([ops.zeros((1, self.hidden_size)), p[rows_name]], axis=0)
                idx = ops.asarray((slot + 1).reshape(hidden.shape[:-1]), dtype="int32")
                out = out + ops.take(table, idx, axis=0) * (self.scale * self.config.fact_scale / len(tables[i]))
        return ops.astype(out, hidden)

    def _fact_trainable(self, batch: LearnBatch) -> Params:
        """The consolidated fact's tables, each with a zero row added for each code that predicts the
        answer and has no row within the radius yet."""
        ops, i = self.ops, self._fact
        if i is None:
            raise RuntimeError("no fact is being consolidated")
        out: Params = {}
        tables = self._tables(i)
        for (rows_name, keys_name), codes in zip(tables, self._fact_codes(batch.hidden, len(tables)), strict=True):
            keys = ops.to_numpy(self.buffers[keys_name]).astype(np.int64)
            want = codes[np.asarray(batch.positions, dtype=np.int64)]
            new = np.unique(want[nearest(want, keys, self.config.fact_radius) < 0])
            rows = self.params[rows_name]
            if new.size:
                order = np.argsort(np.concatenate([keys, new]), kind="stable")
                table = ops.concat([rows, ops.zeros((new.size, self.hidden_size))], axis=0)
                rows = ops.take(table, ops.asarray(order, dtype="int32"), axis=0)
                self.buffers[keys_name] = ops.asarray(np.concatenate([keys, new])[order], dtype="int64")
            out[rows_name] = rows
        return out

    def load_module_state(self, tensors: dict[str, np.ndarray]) -> None:
        # A state written before facts had several tables has no fact_seed; its facts hold one table.
        if "buffer.fact_seed" not in tensors:
            tensors = {**tensors, "buffer.fact_seed": np.array([self.seed], np.int64)}
        super().load_module_state(tensors)

    # --- reporting --------------------------------------------------------------------------
    def reset_session(self) -> None:
        self.generate_hits = 0
        self.generate_positions = 0

    def summary(self) -> dict[str, Any]:
        cfg: HashGradientConfig = self.config  # type: ignore[assignment]
        n, d = int(self._keys.shape[0]), self.hidden_size
        nbytes = n * (4 * d + 8 + 8) + 4 * d * cfg.bits + 4 * d + 4 + 8  # rows, keys, stamps; fixed part
        return {
            "rows": n, "bytes": nbytes, "bits": cfg.bits, "max_rows": cfg.max_rows,
            "evicted": self.evicted, "calibration_tokens": self._count, "scale": round(self.scale, 3),
            "generate_hit_fraction": round(self.generate_hits / self.generate_positions, 4)
            if self.generate_positions else 0.0, "fact_tables": cfg.fact_tables, **self.fact_summary(),
        }


def table_names(i: int, k: int) -> tuple[str, str]:
    """Names of table `k` of fact `i`: its rows (a parameter) and its sorted keys (a buffer)."""
    return (f"fact{i}.rows", f"fact{i}.keys") if k == 0 else (f"fact{i}.rows{k}", f"fact{i}.keys{k}")


def flip_masks(bits: int, radius: int) -> list[np.ndarray]:
    """Per Hamming distance 0..radius, the XOR masks that flip that many of `bits` bits."""
    return [np.zeros(0, np.int64)] + [
        np.array([sum(1 << b for b in c) for c in itertools.combinations(range(bits), r)], np.int64)
        for r in range(1, radius + 1)
    ]


def flip_lookup(codes: np.ndarray, keys: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """Per code, the index in sorted `keys` of the nearest key within the radius `masks` reach (the smallest
    key on ties), or -1: a binary search per flipped code, for the seed table's thousands of keys."""
    out = np.full(codes.shape, -1, np.int64)
    n = keys.shape[0]
    if n == 0:
        return out
    pos = np.minimum(np.searchsorted(keys, codes), n - 1)
    exact = keys[pos] == codes
    out[exact] = pos[exact]
    for flips in masks[1:]:
        todo = np.flatnonzero(out < 0)
        if todo.size == 0:
            break
        cand = codes[todo][:, None] ^ flips[None, :]
        pos = np.minimum(np.searchsorted(keys, cand), n - 1)
        best = np.where(keys[pos] == cand, pos, n).min(axis=1)
        ok = best < n
        out[todo[ok]] = best[ok]
    return out


def nearest(codes: np.ndarray, keys: np.ndarray, radius: int) -> np.ndarray:
    """Per code, the index in sorted `keys` of the nearest key within Hamming distance `radius` (the smallest
    key on ties, as `flip_lookup`), or -1. Compares every pair: a fact's table holds tens of keys, not thousands."""
    codes = np.asarray(codes, np.int64).reshape(-1)
    if keys.shape[0] == 0:
        return np.full(codes.shape, -1, np.int64)
    dist = popcount(codes[:, None] ^ keys[None, :])
    best = dist.argmin(axis=1)  # the first minimum, so the smallest key
    return np.where(dist[np.arange(codes.shape[0]), best] <= radius, best, -1).astype(np.int64)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each non-negative int64 below 2**32 (numpy < 2 has no bitwise_count)."""
    b = np.ascontiguousarray(x, dtype="<u4").view(np.uint8).reshape(*x.shape, 4)
    return np.unpackbits(b, axis=-1).sum(-1, dtype=np.int64)
