"""`BackendView`: a loaded backend as a memory module sees it (`lmm.types.ModelView`).

Owns the narrow surface modules get: sizes, turn encoding, captures and token scores of the frozen
model, extra keys/values to read, and a per-model memo (kept on disk for arrays). It holds no model
code; everything goes through the backend it wraps.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from lmm.model_cache import cached_arrays, model_fingerprint
from lmm.types import Captured, EncodedTurn, ExtraKV

if TYPE_CHECKING:
    from lmm.backends.base import Backend

T = TypeVar("T")


class BackendView:
    """A backend as a memory module sees it (`lmm.types.ModelView`): sizes, turn encoding, captures of
    the frozen model, extra keys/values to read, and a per-model memo. Nothing else of the backend."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._memo: dict[Hashable, Any] = {}
        self.backend_name = backend.name
        self.num_layers = backend.num_layers
        self.hidden_size = backend.hidden_size
        self.ops = backend.ops

    def encode_turn(self, text: str) -> EncodedTurn:
        return self._backend.formatter.standalone_turn(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.formatter.decode(list(ids))

    def capture(self, ids: Sequence[int], *, hidden_layers: Sequence[int] = (),
                kv_layers: Sequence[int] = (), shift: int = 0) -> Captured:
        return self._backend.capture(ids, hidden_layers=hidden_layers, kv_layers=kv_layers, shift=shift)

    def token_logprobs(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return self._backend.token_logprobs(batch)

    def read(self, extra: ExtraKV | None) -> None:
        self._backend.set_extra_kv(extra)

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def stored(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """`memo` for arrays that are also kept on disk, so a new process skips the computation
        (`lmm.model_cache`); the key must change whenever what `compute` does changes."""
        b = self._backend  # the model folder is read once per view, not once per key
        fingerprint = self.memo("fingerprint", lambda: model_fingerprint(b.model_path, b.model_id, b.name,
                                                                         b.precision))
        return self.memo(("stored", key), lambda: cached_arrays(fingerprint, key, compute))
