"""The memory-module contract: every registered module, on both backends, behaves the same way.

One suite parametrised over `lmm.memory.memory_names()` x (torch, mlx_lm) on the tiny random llama
(check 1 also on every family for `identity` and `lora_on_user`):

1. a fresh module is the identity: greedy tokens (and logits) equal the plain backend with no hook;
2. every update runs its module kind's learner: for a "surprise" module it lowers the message's loss
   on its selected tokens (a module with no state leaves it unchanged), a "direct" module says what
   it stored and scores nothing; either way the state changes;
3. save, then load in a fresh process: same greedy reply, same state tensors;
4. loading another module's file fails with a one-line StateFileError naming both modules, and the
   file is byte-for-byte unchanged;
5. same seed, same 2-message session on mlx_lm and torch: state tensors agree within a tolerance,
   greedy replies agree;
plus the safetensors round trip of `state_tensors` and default configs (config validation:
`tests/test_module_configs.py`).

Backends are loaded once per session per (backend, family). The session of checks 2-5 runs once
per (module, backend) (`Runs`) and the tests read from it. Run as a script with `--child`, this file
is also the fresh process of check 3: it reads a JSON request on stdin and prints JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from state_agreement import assert_states_agree

from lmm.backends import Backend, DecodingConfig, load_backend
from lmm.engine import ChatEngine, EngineConfig
from lmm.memory import create_memory, get_memory_spec, memory_names
from lmm.models import resolve_model
from lmm.state import StateFileError, StateHeader, read_state, save_state
from lmm.testing import FAMILIES

HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
MODULES = memory_names()
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("mlx_lm", id="mlx_lm", marks=pytest.mark.mlx),
]
FAMILY = "llama"  # the cross product runs on this one; check 1 also on every family
LEARNING_MODULE = "lora_on_user"  # the learning module of the all-families identity check
MAX_TOKENS = 12
SEED = 0

IDENTITY_PROMPTS = ("Hello! How are you today?", "My favourite colour is blue. What is my favourite colour?")
SESSION = ("My name is Alice and I live in Paris.", "I have a cat called Pepper. What is my name?")
PROBE = "Can you remember what I told you yesterday?"

# The same options for every module that has the field: a few steps at a learning rate large enough
# that one update moves the tiny model's loss by far more than float noise (first SESSION message:
# lora_on_user 15.22 -> 12.89, hash_gradient 15.22 -> 14.19, recurrent_state 15.22 -> 10.16,
# chaptered_bank 15.22 -> 14.43).
COMMON_OPTIONS = {"lr": "1e-2", "steps": "3"}
# Per-module additions, only where a module needs them. trace_bank's write gate is a probe on the
# model's states, meaningless on random weights: the tiny models store every sentence.
MODULE_OPTIONS: dict[str, dict[str, str]] = {"trace_bank": {"write_gate": "all"}}

def module_options(name: str) -> dict[str, str]:
    fields = {f.name for f in dataclasses.fields(get_memory_spec(name).config_cls)}
    return {**{k: v for k, v in COMMON_OPTIONS.items() if k in fields}, **MODULE_OPTIONS.get(name, {})}


def engine_config(module: str, log: Path | None, options: dict[str, str] | None = None) -> EngineConfig:
    return EngineConfig(
        memory=module, memory_options=module_options(module) if options is None else options, seed=SEED,
        activation_log_path=log, background_updates=False, decoding=DecodingConfig(max_tokens=MAX_TOKENS),
    )


def state_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a module's state tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def reply_tokens(engine: ChatEngine, text: str) -> list[int]:
    """Greedy reply tokens (the stream yields every one); the update that follows is scheduled."""
    return [piece.token for piece in engine.stream(text)]


# --- backends, loaded once per (backend, family) ---------------------------------------------------


@dataclass
class Loaded:
    backend: Backend
    folder: Path
    layer_classes: list[type]  # the decoder layers' classes before any hook
    baseline: dict[str, list[int]]  # prompt -> greedy tokens with no hook ever installed


class BackendPool:
    """The shared tiny backends (conftest's `tiny_backend`), each with its layer classes and the greedy
    replies of the plain model, taken the first time this suite uses it."""

    def __init__(self, folders: dict[str, Path], tiny_backend: Any) -> None:
        self.folders = folders
        self.tiny_backend = tiny_backend
        self.loaded: dict[tuple[str, str], Loaded] = {}

    def get(self, name: str, family: str = FAMILY) -> Loaded:
        key = (name, family)
        if key not in self.loaded:
            backend = self.tiny_backend(name, family)
            classes = [type(layer) for layer in backend.layers]
            self.loaded[key] = Loaded(backend, self.folders[family], classes,
                                      {p: plain_tokens(backend, p) for p in IDENTITY_PROMPTS})
        return self.loaded[key]

    def assert_clean(self) -> None:
        """Remove any hook left installed, then check no trace of it stays on the layers."""
        for (name, family), item in self.loaded.items():
            item.backend.remove_hook()
            item.backend.reset_session()
            layers = item.backend.layers
            assert [type(layer) for layer in layers] == item.layer_classes, f"{name}/{family}: layer class changed"
            if name == "torch":
                assert all(not layer._forward_hooks for layer in layers), f"{name}/{family}: hook left"


def plain_tokens(backend: Backend, prompt: str) -> list[int]:
    ids = backend.formatter.generation_ids([{"role": "user", "content": prompt}])
    backend.reset_session()
    out = list(backend.generate(ids, DecodingConfig(max_tokens=MAX_TOKENS)))
    backend.reset_session()
    return out


def prompt_logits(backend: Backend, prompt: str) -> np.ndarray:
    ids = backend.formatter.generation_ids([{"role": "user", "content": prompt}])
    return backend.ops.to_numpy(backend.forward(ids, backend.new_cache(), "generate"))


@pytest.fixture(scope="session")
def pool(tiny_models: dict[str, Path], tiny_backend: Any) -> BackendPool:
    return BackendPool(tiny_models, tiny_backend)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Any:
    """The tiny models gain nothing from intra-op threads, and on a shared 2-core machine torch's
    thread pool spin-waits: one thread made this file several times faster. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _clean_backends(request: pytest.FixtureRequest) -> Any:
    yield
    if "pool" in request.fixturenames:
        request.getfixturevalue("pool").assert_clean()


# --- check 1: a fresh module is the identity -------------------------------------------------------


def assert_identity(item: Loaded, engine: ChatEngine) -> None:
    """Greedy tokens through the engine's hooked backend == the plain backend (hook removed); logits too."""
    backend = item.backend
    engine.learning = False
    for prompt in IDENTITY_PROMPTS:
        engine.reset_chat()
        hooked = reply_tokens(engine, prompt)
        hooked_logits = prompt_logits(backend, prompt)
        plain = engine.respond([{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, memory=False).tokens
        plain_logits = prompt_logits(backend, prompt)  # the hook is off until the engine runs again
        assert len(plain) > 0
        assert hooked == plain, f"{prompt!r}: greedy tokens differ with the fresh module installed"
        assert plain == item.baseline[prompt], "the plain backend no longer matches its output before any hook"
        # Exact for identity and zero-initialised corrections (h + 0); a float-noise margin for others.
        np.testing.assert_allclose(hooked_logits, plain_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("module", MODULES)
def test_fresh_module_is_identity(pool: BackendPool, tmp_path: Path, module: str, backend_name: str) -> None:
    item = pool.get(backend_name)
    engine = ChatEngine(engine_config(module, tmp_path / "act.jsonl"), backend=item.backend)
    try:
        assert_identity(item, engine)
    finally:
        engine.close()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("module", ["identity", LEARNING_MODULE])
def test_fresh_module_is_identity_every_family(pool: BackendPool, tmp_path: Path, module: str, family: str,
                                               backend_name: str) -> None:
    item = pool.get(backend_name, family)
    engine = ChatEngine(engine_config(module, tmp_path / "act.jsonl"), backend=item.backend)
    try:
        assert_identity(item, engine)
    finally:
        engine.close()


def test_identity_check_catches_a_perturbing_module(pool: BackendPool, tmp_path: Path) -> None:
    """Negative control: check 1 fails for a module that changes the hidden states."""
    item = pool.get("torch")
    engine = ChatEngine(engine_config("lora_on_user", tmp_path / "act.jsonl"), backend=item.backend)
    try:
        module, ops = engine.module, engine.module.ops
        noise = np.random.default_rng(1).normal(0.0, 1.0, tuple(module.params["B"].shape)).astype(np.float32)
        module.params["B"] = ops.asarray(noise)
        with pytest.raises(AssertionError):
            assert_identity(item, engine)
    finally:
        engine.close()


# --- the shared session of checks 2-5 --------------------------------------------------------------


@dataclass
class Run:
    """What one (module, backend) did in the SESSION, recorded once and read by several tests."""

    module: str
    config: Any
    fresh_state: dict[str, np.ndarray]
    replies: list[list[int]]
    updates: list[Any]  # UpdateSummary per SESSION message
    state: dict[str, np.ndarray]  # after the session, as saved
    saved: Path
    probe: list[int]  # greedy reply to PROBE in a fresh chat after saving
    kind: str  # the module's learner: "surprise" (selected tokens) or "direct" (writes what was said)
    update_count: int

    @property
    def learns(self) -> bool:
        """A module with no state tensors has nowhere to learn to (identity)."""
        return bool(self.fresh_state)


class Runs:
    def __init__(self, pool: BackendPool, root: Path) -> None:
        self.pool, self.root = pool, root
        self.runs: dict[tuple[str, str], Run] = {}
        self.children: dict[str, dict[str, dict[str, Any]]] = {}

    def get(self, module: str, backend_name: str) -> Run:
        key = (module, backend_name)
        if key not in self.runs:
            self.runs[key] = self._run(module, backend_name)
            self.pool.assert_clean()
        return self.runs[key]

    def _run(self, module: str, backend_name: str) -> Run:
        item = self.pool.get(backend_name)
        folder = self.root / f"{module}-{backend_name}"
        engine = ChatEngine(engine_config(module, folder / "act.jsonl"), backend=item.backend)
        try:
            fresh = engine.module.state_tensors()
            replies, updates = [], []
            for text in SESSION:
                replies.append(reply_tokens(engine, text))
                updates.append(engine.wait_for_update())
            state = engine.module.state_tensors()
            saved = engine.save_memory(folder / f"{module}.safetensors")
            engine.learning = False
            engine.reset_chat()
            probe = reply_tokens(engine, PROBE)
            return Run(module, engine.module.config, fresh, replies, updates, state, saved, probe,
                       engine.module.kind, engine.module.update_count)
        finally:
            engine.close()

    def child(self, backend_name: str) -> dict[str, dict[str, Any]]:
        """Load every module's saved file in one fresh process per backend; module -> its answer.

        The processes for all available backends start together: their start-up (imports) dominates."""
        if backend_name not in self.children:
            names = ["torch"] + (["mlx_lm"] if HAS_MLX else [])
            root = Path(__file__).resolve().parents[1]
            env = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
            procs = {}
            for name in names:
                jobs = [{"module": m, "path": str(self.get(m, name).saved)} for m in MODULES]
                request = {"backend": name, "model": str(self.pool.get(name).folder), "probe": PROBE,
                           "max_tokens": MAX_TOKENS, "jobs": jobs}
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=root, env=env)
                procs[name] = (proc, json.dumps(request))
            for name, (proc, request) in procs.items():
                out, err = proc.communicate(request, timeout=300)
                assert proc.returncode == 0, f"{name} child process failed:\n{err[-3000:]}"
                answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
                self.children[name] = {a["module"]: a for a in answers}
        return self.children[backend_name]


@pytest.fixture(scope="session")
def runs(pool: BackendPool, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(pool, tmp_path_factory.mktemp("contract_runs"))


# --- check 2: an update lowers the message's loss ---------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("module", MODULES)
def test_update_lowers_loss(runs: Runs, module: str, backend_name: str) -> None:
    run = runs.get(module, backend_name)
    for text, update in zip(SESSION, run.updates, strict=True):  # a first message, and one with a chat before it
        assert update is not None and update.skipped is None, f"{text!r}: no update ran: {update}"
        assert update.learner == run.kind
        if run.kind == "direct":  # it says what it wrote, and scores nothing
            assert update.stored and update.note and update.loss is None and not update.selected_tokens
            continue
        assert update.selected_tokens, f"{text!r}: the message must have selected tokens"
        assert update.loss is not None and update.loss_after is not None
        if run.learns:
            assert update.loss_after < update.loss, f"{text!r}: loss did not drop: {update.loss} -> {update.loss_after}"
        else:
            assert abs(update.loss_after - update.loss) < 1e-5, f"{text!r}: a module that does not learn changed it"
    if run.learns:
        assert state_digest(run.state) != state_digest(run.fresh_state), "learning left the state unchanged"


def test_loss_check_catches_a_module_that_does_not_learn(pool: BackendPool, tmp_path: Path) -> None:
    """Negative control: zero steps leaves the loss where it was, which check 2 would reject."""
    item = pool.get("torch")
    options = {**module_options("lora_on_user"), "steps": "0"}
    engine = ChatEngine(engine_config("lora_on_user", tmp_path / "act.jsonl", options), backend=item.backend)
    try:
        reply_tokens(engine, SESSION[0])
        update = engine.wait_for_update()
        assert update is not None and update.selected_tokens
        assert not update.loss_after < update.loss
    finally:
        engine.close()


# --- check 3: save, then load in a fresh process -----------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("module", MODULES)
def test_save_load_in_fresh_process(runs: Runs, module: str, backend_name: str) -> None:
    run = runs.get(module, backend_name)
    answer = runs.child(backend_name)[module]
    assert answer["state_sha256"] == state_digest(run.state), "state tensors differ after loading"
    assert answer["tokens"] == run.probe, "the reloaded memory replies differently"
    assert answer["update_count"] == run.update_count == (len(SESSION) if run.learns else 0)
    assert len(run.probe) > 0


# --- check 4: another module's file is refused --------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("module", MODULES)
def test_load_other_module_file_fails_cleanly(runs: Runs, pool: BackendPool, tmp_path: Path, module: str,
                                              backend_name: str) -> None:
    other = MODULES[(MODULES.index(module) + 1) % len(MODULES)]
    assert other != module, "needs at least two registered modules"
    path = runs.get(other, backend_name).saved
    before = path.read_bytes()
    engine = ChatEngine(engine_config(module, tmp_path / "act.jsonl"), backend=pool.get(backend_name).backend)
    try:
        current, state = engine.module, state_digest(engine.module.state_tensors())
        with pytest.raises(StateFileError) as caught:
            engine.load_memory(path)
        message = str(caught.value)
        assert "\n" not in message and message.strip() == message
        for name in (module, other):
            assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message), f"{name!r} not in {message!r}"
        assert engine.module is current and state_digest(engine.module.state_tensors()) == state
    finally:
        engine.close()
    assert path.read_bytes() == before, "the refused file was changed"


# --- check 5: the same session on both backends --------------------------------------------------------


@pytest.mark.mlx
@pytest.mark.parametrize("module", MODULES)
def test_same_seed_same_result_on_both_backends(runs: Runs, module: str) -> None:
    a, b = runs.get(module, "torch"), runs.get(module, "mlx_lm")
    assert a.replies == b.replies, "greedy replies differ between torch and mlx_lm"
    assert a.probe == b.probe
    assert sorted(a.state) == sorted(b.state)
    for name in a.state:
        if name.endswith("_at"):  # wall-clock times (when something was said) differ between two runs
            assert a.state[name].shape == b.state[name].shape, name
            continue
        assert_states_agree(a.state[name], b.state[name], name)
    for ua, ub in zip(a.updates, b.updates, strict=True):
        assert ua.selected_tokens == ub.selected_tokens and ua.stored == ub.stored
        if ua.loss is not None:
            assert ua.loss == pytest.approx(ub.loss, abs=1e-3)
            assert ua.loss_after == pytest.approx(ub.loss_after, abs=1e-3)
    if a.learns:
        assert state_digest(a.state) != state_digest(a.fresh_state), "nothing learned: the comparison is vacuous"


# --- state files, configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("module", MODULES)
def test_state_tensors_round_trip_through_safetensors(runs: Runs, pool: BackendPool, tmp_path: Path,
                                                      module: str, backend_name: str) -> None:
    run = runs.get(module, backend_name)
    backend = pool.get(backend_name).backend
    header = StateHeader(module=module, config=run.config.to_json(), model_id=backend.model_id,
                         hidden_size=backend.hidden_size, layer=backend.num_layers // 2)
    for label, tensors in (("fresh", run.fresh_state), ("learned", run.state)):
        path = tmp_path / f"{label}.safetensors"
        save_state(path, header, tensors)
        read_header, read = read_state(path)
        assert read_header.module == module and read_header.config_dict() == run.config.to_dict()
        assert sorted(read) == sorted(tensors)
        for name, value in tensors.items():
            assert read[name].dtype == value.dtype and read[name].shape == value.shape, name
            np.testing.assert_array_equal(read[name], value, err_msg=name)
        fresh = create_memory(module, hidden_size=backend.hidden_size, ops=backend.ops, seed=SEED + 1,
                              config=run.config)
        fresh.load_state_tensors(read)
        assert state_digest(fresh.state_tensors()) == state_digest(tensors), f"{label}: load_state_tensors"


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("module", MODULES)
def test_default_config_builds(pool: BackendPool, module: str, backend_name: str) -> None:
    spec = get_memory_spec(module)
    config = spec.config_cls()
    assert spec.config_cls.from_dict(json.loads(config.to_json())) == config
    backend = pool.get(backend_name).backend
    built = create_memory(module, hidden_size=backend.hidden_size, ops=backend.ops)
    assert built.config == config and built.name == module
    assert isinstance(built.summary(), dict)


# Values each field must refuse, where a module has such a field; every module is also probed generically.
# --- the fresh process of check 3 -------------------------------------------------------------------------


def _child_main() -> None:
    request = json.loads(sys.stdin.read())
    resolved = resolve_model(request["model"], local_files_only=True)
    backend = load_backend(request["backend"], resolved.path, resolved.model_id, device="cpu")
    for job in request["jobs"]:
        config = EngineConfig(memory=job["module"], activation_log_path=None, background_updates=False,
                              seed=SEED, decoding=DecodingConfig(max_tokens=request["max_tokens"]))
        engine = ChatEngine(config, backend=backend)
        try:
            engine.load_memory(job["path"])
            digest = state_digest(engine.module.state_tensors())
            engine.learning = False
            tokens = reply_tokens(engine, request["probe"])
            print(json.dumps({"module": job["module"], "tokens": tokens, "state_sha256": digest,
                              "update_count": engine.module.update_count}), flush=True)
        finally:
            engine.close()
            backend.remove_hook()


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    _child_main()
