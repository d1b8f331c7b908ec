"""Memory state files: safetensors with a metadata header, written atomically.

Owns the file format (tensor names come from the module, metadata from `StateHeader`),
the atomic write (temporary file in the same folder, fsync, rename: an interrupted save
leaves the previous file intact), the checks that refuse a file before anything is changed
(unreadable, not finite, of another module, model, hidden size or layer), and where a
state's unsaved-session autosave lives (`recovery_path`), and the readable JSON export
(`write_export`). It never writes to a file it
failed to read. Who writes when is the session's and engine's business.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = "1"


class StateFileError(ValueError):
    """A state file is unreadable or does not fit the running chat. The message is one line."""


@dataclass
class StateHeader:
    module: str
    config: str  # JSON of the module's config
    model_id: str
    hidden_size: int
    layer: int
    update_count: int = 0
    created_at: str = ""
    saved_at: str = ""
    backend: str = ""
    format_version: str = FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> StateHeader:
        missing = [f.name for f in fields(cls) if f.name not in meta and f.name not in {"backend"}]
        if missing:
            raise StateFileError(f"{path}: not an lmm state file (metadata lacks {', '.join(missing)})")
        try:
            return cls(
                module=meta["module"], config=meta["config"], model_id=meta["model_id"],
                hidden_size=int(meta["hidden_size"]), layer=int(meta["layer"]),
                update_count=int(meta["update_count"]), created_at=meta["created_at"],
                saved_at=meta["saved_at"], backend=meta.get("backend", ""),
                format_version=meta["format_version"],
            )
        except ValueError as exc:
            raise StateFileError(f"{path}: malformed lmm metadata ({exc})") from None

    def config_dict(self) -> dict:
        return json.loads(self.config)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def iso_time(when: float) -> str:
    """A Unix time as an ISO 8601 string in UTC, to the second."""
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")


def write_export(path: Path, *, module: str, model_id: str, updates: int, config: dict[str, Any],
                 items: Sequence[Any], summary: dict[str, Any]) -> Path:
    """A memory's items (objects with `text`, `said_at` seconds or None, `replaced_by`) and figures as JSON
    a person can read, numbered from 1 as `/memory list` numbers them; returns `path`."""
    rows = [{"number": i, "text": item.text, "said_at": None if item.said_at is None else iso_time(item.said_at),
             "replaced_by": item.replaced_by} for i, item in enumerate(items, start=1)]
    doc = {"module": module, "model": model_id, "updates": updates, "exported_at": now_iso(), "config": config,
           "items": rows, "summary": summary}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


def recovery_path(path: Path) -> Path:
    """Where the engine autosaves after each update until `path` itself is saved: a chat that
    dies before saving leaves its memory here, and the next chat of `path` starts from it."""
    path = Path(path)
    return path.with_name(path.name + ".unsaved")


def nonfinite_tensor(tensors: dict[str, np.ndarray]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, value in tensors.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return name
    return None


def default_save_path(module: str, root: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    return root / f"{module}_{stamp}.safetensors"


def save_state(path: Path, header: StateHeader, tensors: dict[str, np.ndarray]) -> None:
    """Write atomically: a crash at any point leaves either the old file or the new one."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                  metadata=header.to_metadata())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def promote(source: Path, path: Path) -> None:
    """Make an already written state file (an autosave beside `path`) the file at `path`: one atomic
    rename instead of writing the memory again."""
    os.replace(source, path)
    _fsync_dir(Path(path).parent)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state(path: Path, *, mapped: bool | Callable[[StateHeader], bool] = False
               ) -> tuple[StateHeader, dict[str, np.ndarray]]:
    """Read header and tensors; any problem becomes a one-line StateFileError. `mapped` (or what it
    says of the header): the tensors are read-only views of the file mapped into memory, whose pages
    are read when touched, so opening a memory of any size costs the same."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            header = StateHeader.from_metadata(meta, path)
            if callable(mapped):
                mapped = mapped(header)
            tensors = _mapped_tensors(path) if mapped else {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, StateFileError):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StateFileError(f"{path}: not a readable safetensors state file ({msg})") from None
    bad = nonfinite_tensor(tensors)
    if bad is not None:
        raise StateFileError(f"{path}: tensor {bad} holds NaN or infinite values (a corrupted memory)")
    if header.format_version != FORMAT_VERSION:
        raise StateFileError(
            f"{path}: state format version {header.format_version}, this lmm reads {FORMAT_VERSION}"
        )
    return header, tensors


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _mapped_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (already opened and checked by `safe_open`) as read-only
    views of one memory map: nothing is copied. The mapping stays valid after the file is replaced
    (an atomic save renames a new file over it)."""
    import mmap

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise ValueError("empty file")
        buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    n = int.from_bytes(buffer[:8], "little")
    entries = json.loads(bytes(buffer[8: 8 + n]))
    out = {}
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {name} has dtype {entry.get('dtype')}, which lmm does not store")
        begin, end = (8 + n + int(x) for x in entry["data_offsets"])
        shape = tuple(int(x) for x in entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end > size or end - begin != count * np.dtype(dtype).itemsize:
            raise ValueError(f"tensor {name} lies outside the file")
        out[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=begin).reshape(shape)
    return out


def check_compatible(header: StateHeader, path: Path, *, module: str, model_id: str,
                     hidden_size: int, layer: int) -> None:
    checks = (
        ("module", header.module, module),
        ("model", header.model_id, model_id),
        ("hidden size", header.hidden_size, hidden_size),
        ("layer", header.layer, layer),
    )
    for what, found, expected in checks:
        if found != expected:
            raise StateFileError(
                f"{path}: state was saved for {what} {found!r}, but this chat runs {what} {expected!r}"
            )
