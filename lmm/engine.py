"""The chat engine: one model, one memory module, one conversation. The Python API.

Owns the conversation (messages, system prompt), the memory module's life cycle (create, hook, learn
after each user message in the background, save, load, reset), the guard around each update (a state
that is not finite afterwards is rolled back) and the crash-safe autosave after it, context-window
trimming and per-turn results. Scripts, benchmarks and the CLI all drive it through `ChatEngine`. It
holds no UI code: notices go to a callback, text comes back as `GenerationResponse` objects.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmm.backends import Backend, DecodingConfig, load_backend
from lmm.chat_format import Message
from lmm.consolidation import ConsolidationConfig, Consolidator, consolidate_message
from lmm.events import EventLog
from lmm.hook import MemoryHook
from lmm.learning import LEARNERS, UpdateSummary
from lmm.memory import create_memory, get_memory_spec
from lmm.memory.base import GradientMemory, MemoryItem, MemoryModule, ReadItem
from lmm.models import artifacts_dir, resolve_model
from lmm.state import (
    StateFileError,
    StateHeader,
    check_compatible,
    default_save_path,
    nonfinite_tensor,
    now_iso,
    promote,
    read_state,
    recovery_path,
    save_state,
    write_export,
)
from lmm.turns import GenerationResponse, TurnResult


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    local_files_only: bool = False
    memory: str = "identity"
    memory_options: dict[str, str] = field(default_factory=dict)
    layer: int | None = None  # None: the middle layer
    seed: int = 0
    system_prompt: str | None = None
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    activation_log_path: Path | None = Path("logs/memory_activations.jsonl")
    log_activations: bool = True
    background_updates: bool = True
    consolidate: bool = False  # gradient modules: consolidate each statement (lmm.consolidation)
    consolidation_options: dict[str, str] = field(default_factory=dict)  # ConsolidationConfig fields

    def __post_init__(self) -> None:
        # Checked before any model loads: a bad module name or option fails at once, not after the load.
        get_memory_spec(self.memory).config_cls.from_strings(self.memory_options)
        ConsolidationConfig.from_strings(self.consolidation_options)


class ChatEngine:
    """One conversation with one memory module on a loaded backend. Several engines may share a
    backend; each owns its hook and installs it again whenever it runs the model."""

    def __init__(self, config: EngineConfig, *, backend: Backend | None = None,
                 on_notice: Callable[[str], None] = lambda msg: None) -> None:
        self.config = config
        self.notice = on_notice
        self._owns_backend = backend is None  # loaded here: closed here
        if backend is None:
            resolved = resolve_model(config.model, local_files_only=config.local_files_only)
            backend = load_backend(config.backend, resolved.path, resolved.model_id, device=config.device,
                                   dtype=config.dtype, local_files_only=config.local_files_only
                                   or Path(resolved.path).is_dir())
        self.backend = backend
        self.layer = backend.num_layers // 2 if config.layer is None else config.layer
        if not 0 <= self.layer < backend.num_layers:
            raise ValueError(f"--layer {self.layer} is out of range: the model has {backend.num_layers} layers")
        self.log = EventLog(config.activation_log_path)
        self.learning = True  # False in incognito mode
        self.messages: list[Message] = []
        self.turns = 0
        self.created_at = now_iso()
        self.last_update: UpdateSummary | None = None
        self._read_seconds = 0.0  # the module's read before the last reply (part of its time to first token)
        self._read_items: list[ReadItem] = []  # what it read (TurnResult.read)
        self.history: list[TurnResult] = []  # every turn of this engine, with its update once applied
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmm-update",
                                            initializer=backend.prepare_thread)
        self._pending: Future[UpdateSummary] | None = None
        self._updated_in_background = False  # the update thread has run: it must release what it holds
        self.autosave_path: Path | None = None  # set_autosave: written after every change of the memory
        self.saved_as: Path | None = None  # the file that holds exactly this memory (None: changed since)
        self._autosaved = False  # the autosave file holds exactly this memory: a save renames it
        self._state: dict[str, np.ndarray] | None = None  # the module's state after its last good update
        self.module = create_memory(config.memory, hidden_size=backend.hidden_size, ops=backend.ops,
                                    seed=config.seed, options=config.memory_options)
        self._install(self.module)
        self._consolidator: Consolidator | None = None
        self._consolidation = ConsolidationConfig.from_strings(config.consolidation_options)
        if config.consolidate:
            self.set_consolidate(True)
        if config.decoding.strategy == "beam" and not backend.supports_beam:
            self.notice(f"{backend.name} has no beam search; decoding falls back to "
                        f"{config.decoding.resolved(False)}")

    # --- conversation -------------------------------------------------------------------
    def chat_messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        return system + self.messages

    def stream(self, user_text: str, should_stop: Callable[[], bool] = lambda: False
               ) -> Iterator[GenerationResponse]:
        """Stream the reply to `user_text`, one response per token; afterwards `self.last_turn`
        holds the TurnResult, and the memory update runs (in the background by default)."""
        self.wait_for_update()
        self.messages.append({"role": "user", "content": user_text})
        self._claim()
        prompt = self._fit_context()
        self._read(self.chat_messages())
        tokens: list[int] = []
        try:
            yield from self._generate(prompt, self.config.decoding, should_stop, tokens)
        except BaseException:
            self.backend.reset_session()
            raise
        finally:
            self.last_turn = self._turn_result(user_text, tokens)
            self.messages.append({"role": "assistant", "content": self.last_turn.assistant})
            self.turns += 1
            self.history.append(self.last_turn)
        self._schedule_update(len(self.chat_messages()) - 2)

    def respond(self, messages: list[Message], *, max_tokens: int | None = None, memory: bool = True,
                fresh_cache: bool = True) -> TurnResult:
        """A reply to `messages` (the engine's system prompt goes first) outside the conversation:
        nothing is added to it and nothing is learned. `memory=False`: the plain model, hook
        removed. Benchmarks use it for probes; the oldest exchanges go when the window is full."""
        self.wait_for_update()
        decoding = self.config.decoding if max_tokens is None else dataclasses.replace(
            self.config.decoding, max_tokens=max_tokens)
        system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        msgs = system + [dict(m) for m in messages]
        prompt = self.backend.formatter.fitted_ids(msgs, len(system), self.backend.context_length
                                                   - decoding.max_tokens, keep=2)
        if memory:
            self._claim()
            self._read(msgs)
        else:
            self.backend.remove_hook()
            self._read_seconds, self._read_items = 0.0, []
        if fresh_cache:
            self.backend.reset_session()
        tokens: list[int] = []
        for _ in self._generate(prompt, decoding, lambda: False, tokens):
            pass
        return self._turn_result(msgs[-1]["content"] if msgs else "", tokens)

    def _generate(self, prompt: list[int], decoding: DecodingConfig, should_stop: Callable[[], bool],
                  tokens: list[int]) -> Iterator[GenerationResponse]:
        """Every generated token as a response (held back by one, so that the last carries the
        finish reason); `tokens` collects the ids."""
        fmt = self.backend.formatter
        text = full = ""
        start = time.perf_counter()
        held: GenerationResponse | None = None
        for tok in self.backend.generate(prompt, decoding, should_stop):
            tokens.append(tok)
            full = fmt.decode(tokens)
            delta = ""
            if not full.endswith("\ufffd"):  # else an unfinished UTF-8 sequence: its text comes later
                delta, text = full[len(text):], full
            elapsed = time.perf_counter() - start
            if held is not None:
                yield held
            held = GenerationResponse(delta, tok, len(tokens), len(tokens) / elapsed if elapsed else 0.0)
        if held is not None:
            held.text += full[len(text):]  # what an unfinished sequence left at the end
            held.finish_reason = self.backend.last_stats.finish_reason
            yield held

    def _read(self, messages: list[Message]) -> None:
        """The module's look at the chat before a reply (what it reads); its time counts toward the
        reply's time to first token, since the user waits for it."""
        start = time.perf_counter()
        self.module.before_reply(messages)
        self._read_seconds = time.perf_counter() - start
        self._read_items = self.module.last_read()

    def _turn_result(self, user_text: str, tokens: list[int]) -> TurnResult:
        stats = self.backend.last_stats
        return TurnResult(user_text, self.backend.formatter.decode(tokens).strip(), stats.generated_tokens,
                          stats.tokens_per_second, stats.time_to_first_token + self._read_seconds,
                          stats.finish_reason, tokens=list(tokens), read=list(self._read_items))

    def ask(self, user_text: str) -> TurnResult:
        """Reply to `user_text` and wait for the memory update that follows it."""
        for _ in self.stream(user_text):
            pass
        turn = self.last_turn
        turn.update = self.wait_for_update()
        return turn

    # --- settings ---------------------------------------------------------------------
    def set_decoding(self, **changes: Any) -> DecodingConfig:
        """Change decoding settings (validated; a bad value raises ValueError and changes nothing)."""
        self.config.decoding = dataclasses.replace(self.config.decoding, **changes)
        return self.config.decoding

    def set_system_prompt(self, text: str | None) -> None:
        """A new system prompt (None: the template's default) for the following turns."""
        self.wait_for_update()
        self.config.system_prompt = text
        self.backend.reset_session()  # the cached prefix starts with the old system prompt

    def hand_over(self) -> None:
        """Run last on the thread that built this engine when another thread runs the chat."""
        self.backend.release_thread()

    def take_over(self) -> None:
        """Run first on the thread that runs the chat when another thread built this engine."""
        self.backend.prepare_thread()

    def set_notice(self, notice: Callable[[str], None]) -> None:
        """Where one-line notices go (the CLI prints them on stderr, the REPL styles them)."""
        self.notice = notice

    def reset_chat(self) -> None:
        """Clear the chat history; the memory keeps what it learned."""
        self.wait_for_update()
        self.messages.clear()
        self.backend.reset_session()
        self.module.reset_session()

    def _fit_context(self) -> list[int]:
        fmt = self.backend.formatter
        budget = self.backend.context_length - self.config.decoding.max_tokens
        msgs = self.chat_messages()
        first = len(msgs) - len(self.messages)
        prompt = fmt.fitted_ids(msgs, first, budget, keep=1)
        self.messages[:] = msgs[first:]
        if len(prompt) > budget:
            content = self.messages[-1]["content"]
            ids = fmt.encode(content)
            keep = max(1, len(ids) - (len(prompt) - budget))
            self.messages[-1]["content"] = fmt.decode(ids[-keep:])
            self.notice(f"message longer than the context window: kept its last {keep} of {len(ids)} tokens")
            prompt = fmt.generation_ids(self.chat_messages())
        return prompt

    # --- learning -----------------------------------------------------------------------
    def _schedule_update(self, index: int) -> None:
        if not self.learning:
            self.last_turn.update = self.last_update = UpdateSummary(turn=index, skipped="incognito")
            return
        messages = [dict(m) for m in self.chat_messages()]
        self._submit(lambda: self._update(messages, index))

    def _submit(self, work: Callable[[], UpdateSummary]) -> None:
        """Run an update in the background (the default) or now."""
        if self.config.background_updates:
            self._pending = self._executor.submit(work)
            self._updated_in_background = True
        else:
            self._collect(work())

    def _update(self, messages: list[Message], index: int) -> UpdateSummary:
        """One update, guarded: a state that is not finite afterwards is undone; a good one is autosaved."""
        before = self._state if self._state is not None else self._snapshot()
        count = self.module.update_count
        self._autosaved = False
        self._claim()
        if self.consolidating:
            summary = consolidate_message(self._consolidator_for(), self.module, self.hook, self.log, messages, index,
                                          snapshot=self._snapshot, restore=self._restore)
        else:
            summary = LEARNERS[self.module.kind](self.backend, self.module, self.hook, self.log, messages, index)
        if summary.skipped is not None:
            return summary
        start = time.perf_counter()
        after = self._snapshot()
        bad = nonfinite_tensor(after)
        if bad is not None:
            self._restore(before)
            self.module.update_count = count
            summary.rolled_back = summary.skipped = bad
            return summary
        self._state = after
        self.saved_as = None
        if self.autosave_path is not None:
            self._write_autosave(after)
            summary.autosave_seconds = time.perf_counter() - start
        return summary

    def _restore(self, tensors: dict[str, np.ndarray]) -> None:
        self.module.load_state_tensors(tensors)
        self.module.reset_learner()
        self.backend.reset_session()

    # --- consolidation --------------------------------------------------------------------
    @property
    def consolidating(self) -> bool:
        return self._consolidator is not None and isinstance(self.module, GradientMemory)

    def set_consolidate(self, on: bool) -> bool:
        """Consolidate each statement the user makes into the module's weights (gradient modules only);
        return whether consolidation is on. A module of another kind keeps learning as it does."""
        self.wait_for_update()
        if on and not isinstance(self.module, GradientMemory):
            self.notice(f"--consolidate applies to gradient modules; {self.module.name} learns as before")
        if not on:
            self._consolidator = None
        elif self._consolidator is None:
            self._consolidator = Consolidator(self.backend, self._consolidation)
        return self.consolidating

    def _consolidator_for(self) -> Consolidator:
        assert self._consolidator is not None
        system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        self._consolidator.system = system  # questions are asked as this chat asks them
        return self._consolidator

    def consolidate_session(self) -> int:
        """Consolidate every earlier user message of this chat (in the background); turn consolidation on
        for the following ones. Return how many messages were queued."""
        if not self.set_consolidate(True) or not self.learning:
            return 0
        messages = [dict(m) for m in self.chat_messages()]
        indices = [i for i, m in enumerate(messages) if m["role"] == "user"]

        def work() -> UpdateSummary:
            parts = [self._update(messages, i) for i in indices]
            return UpdateSummary(turn=len(messages) - 1, learner="consolidate",
                                 consolidated=[c for p in parts for c in p.consolidated],
                                 note="; ".join(p.note for p in parts if p.note), seconds=sum(p.seconds for p in parts),
                                 rolled_back=next((p.rolled_back for p in parts if p.rolled_back), None))

        if indices:
            self._submit(work)
        return len(indices)

    def _snapshot(self) -> dict[str, np.ndarray]:
        # Copies: a CPU tensor's numpy view would follow later in-place changes.
        return {k: np.array(v, copy=True) for k, v in self.module.state_tensors().items()}

    def _collect(self, summary: UpdateSummary) -> None:
        self.last_turn.update = self.last_update = summary
        if summary.rolled_back:
            self.notice(f"update rolled back: tensor {summary.rolled_back} was not finite after it; "
                        "the memory is as it was before this message")
        if summary.dropped:
            shown = "; ".join(repr(text) for text in summary.dropped[:3])
            more = f" and {len(summary.dropped) - 3} more" if len(summary.dropped) > 3 else ""
            self.notice(f"memory full: dropped {len(summary.dropped)} least recently read "
                        f"item{'s' if len(summary.dropped) != 1 else ''} to make room: {shown}{more}")

    def wait_for_update(self) -> UpdateSummary | None:
        """Block until the pending update is applied; return the latest update summary."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._collect(pending.result())
        return self.last_update

    def update_done(self, timeout: float = 0.0) -> bool:
        """True when no update is pending, waiting at most `timeout` seconds for the pending one."""
        pending = self._pending
        if pending is not None:
            wait([pending], timeout=timeout)
        return pending is None or pending.done()

    # --- memory state --------------------------------------------------------------------
    def set_autosave(self, path: Path | None) -> None:
        """Autosave the memory to `path` after every update, forget and load (None: stop)."""
        self.wait_for_update()
        self.autosave_path = Path(path) if path is not None else None
        self._autosaved = False

    def _write_autosave(self, tensors: dict[str, np.ndarray] | None = None) -> None:
        if self.autosave_path is not None:
            save_state(self.autosave_path, self.header(), tensors if tensors is not None else self._snapshot())
        self._autosaved = self.autosave_path is not None

    def _install(self, module: MemoryModule) -> None:
        module.attach(self.backend.view(), self.layer)  # may refuse the module: nothing changed yet
        self.module = module
        self._state, self.saved_as, self._autosaved = None, None, False
        self.last_update = None  # it described another memory (e.g. the previous user's)
        self.hook = MemoryHook(module, self.log, layer=self.layer, backend=self.backend.name,
                               model=self.backend.model_id, log_activations=self.config.log_activations)
        self.backend.install_hook(self.layer, self.hook)
        self.backend.reset_session()

    def _claim(self) -> None:
        """Make this engine's hook the backend's (another engine on the same backend may have run)."""
        if self.backend.installed_hook is not self.hook:
            self.backend.install_hook(self.layer, self.hook)
            self.backend.reset_session()
            self.module.reset_session()

    def header(self) -> StateHeader:
        return StateHeader(
            module=self.module.name, config=self.module.config.to_json(), model_id=self.backend.model_id,
            hidden_size=self.backend.hidden_size, layer=self.layer, update_count=self.module.update_count,
            created_at=self.created_at, saved_at=now_iso(), backend=self.backend.name,
        )

    def save_memory(self, path: Path | str | None = None) -> Path:
        """Save the memory atomically (after any pending update); return the path written."""
        self.wait_for_update()
        target = Path(path) if path else default_save_path(self.module.name, artifacts_dir())
        if self._autosaved and self.autosave_path == recovery_path(target) and self.autosave_path.exists():
            promote(self.autosave_path, target)  # a large memory is not written twice (gone: not promoted twice)
        else:
            save_state(target, self.header(), self.module.state_tensors())
        self.saved_as = target
        return target

    def load_memory(self, path: Path | str) -> None:
        """Replace the memory with a saved one. On any error the current memory stays as it was."""
        self.wait_for_update()
        path = Path(path)
        header, tensors = read_state(path, mapped=lambda h: h.module == self.module.name and self.module.maps_state)
        check_compatible(header, path, module=self.module.name, model_id=self.backend.model_id,
                         hidden_size=self.backend.hidden_size, layer=self.layer)
        spec = get_memory_spec(header.module)
        previous = self.module.config
        try:
            config = spec.config_cls.from_dict(header.config_dict())
            module = create_memory(header.module, hidden_size=self.backend.hidden_size, ops=self.backend.ops,
                                   seed=self.config.seed, config=config)
            module.load_state_tensors(tensors)
            module.update_count = header.update_count
            self._install(module)
        except (ValueError, TypeError, KeyError) as exc:  # a config or tensor set that does not fit
            raise StateFileError(f"{path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if config != previous:
            self.notice(f"memory config taken from {path.name}: {config.to_json()}")
        self.created_at = header.created_at
        self.saved_as = path
        self._write_autosave()

    def memory_items(self) -> list[MemoryItem]:
        """What the memory holds as separate items, oldest first (none for weight-only modules)."""
        self.wait_for_update()
        return self.module.items()

    def forget_item(self, number: int) -> str:
        """Delete item `number` (1-based, as `memory_items` lists them); return its text."""
        self.wait_for_update()
        if number < 1:
            raise ValueError(f"item numbers start at 1, got {number}")
        text = self.module.forget_item(number - 1)
        self._state = self.saved_as = None
        self.backend.reset_session()
        self._write_autosave()
        return text

    def export_memory(self, path: Path | str) -> Path:
        """Write what the memory holds as JSON a person can read (items, figures); return the path."""
        return write_export(Path(path), module=self.module.name, model_id=self.backend.model_id,
                            updates=self.module.update_count, config=self.module.config.to_dict(),
                            items=self.memory_items(), summary=self.module.summary())

    def forget(self) -> None:
        """Reset the memory to its freshly initialised state."""
        self.wait_for_update()
        module = create_memory(self.module.name, hidden_size=self.backend.hidden_size, ops=self.backend.ops,
                               seed=self.config.seed, config=self.module.config)
        self.created_at = now_iso()
        self._install(module)
        self._write_autosave()

    def close(self) -> None:
        """Finish the pending update, release the update thread (and the backend, if this engine
        loaded it); the engine is not used after."""
        self.wait_for_update()
        if self._updated_in_background:
            self._executor.submit(self.backend.release_thread).result()
        self._executor.shutdown(wait=True)
        if self._owns_backend:
            self.backend.close()
        elif self.backend.installed_hook is self.hook:
            self.backend.remove_hook()
        self.log.close()
