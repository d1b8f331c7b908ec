"""ChatEngine on tiny models: learning, scheduling, logs and state files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmm.backends import DecodingConfig
from lmm.engine import ChatEngine, EngineConfig
from lmm.events import loss_by_decoded_token
from lmm.state import StateFileError, read_state, save_state

TEACH = "the cat sat on the mat and looked at the moon"


def make_engine(backend_name: str, tiny_backend, tmp_path: Path, memory: str = "lora_on_user",
                **overrides) -> ChatEngine:
    backend = tiny_backend(backend_name, "llama")
    settings = dict(memory=memory, memory_options={"lr": "0.01"} if memory == "lora_on_user" else {},
                    activation_log_path=tmp_path / "log.jsonl", decoding=DecodingConfig(max_tokens=8))
    config = EngineConfig(**{**settings, **overrides})
    return ChatEngine(config, backend=backend)


def test_update_learns_content_tokens_and_logs(backend_name: str, tiny_backend, tmp_path: Path) -> None:
    engine = make_engine(backend_name, tiny_backend, tmp_path)
    turn = engine.ask(TEACH)
    engine.close()
    update = turn.update
    assert update is not None and update.skipped is None
    assert update.loss_after < update.loss
    learned = [tok for tok, _, chosen in update.token_losses if chosen]
    assert learned == update.selected_tokens
    content = "".join(tok for tok, _, _ in update.token_losses)
    assert content.strip() == TEACH  # scaffolding and the default system prompt are not content
    ce = np.array([c for _, c, _ in update.token_losses])
    assert all(c > ce.mean() for _, c, chosen in update.token_losses if chosen)
    assert all(c <= ce.mean() for _, c, chosen in update.token_losses if not chosen)

    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records if r["kind"] == "update"]
    assert stages == ["pre_hooks", "post_hooks"]
    post = [r for r in records if r["kind"] == "update"][-1]
    assert len(post["user_response_target_token_ids"]) == len(post["user_response_token_losses"])
    assert len(post["user_response_raw_target_token_ids"]) > len(post["user_response_target_token_ids"])
    assert post["grad_norms"]["B"] > 0 and post["update_seconds"] > 0
    activations = [r for r in records if r["kind"] == "activation"]
    assert activations and len(activations[0]["input_tail"][0]) == 5
    assert activations[0]["layer"] == engine.layer == 2


def test_background_update_equals_synchronous(tiny_backend, tmp_path: Path) -> None:
    states = []
    for background in (True, False):
        engine = make_engine("torch", tiny_backend, tmp_path, background_updates=background)
        for text in (TEACH, "what did the cat see"):
            engine.ask(text)
        states.append(engine.module.state_tensors())
        engine.close()
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])


def test_save_waits_for_pending_update_and_roundtrips(tiny_backend, tmp_path: Path) -> None:
    engine = make_engine("torch", tiny_backend, tmp_path)
    for _ in engine.stream(TEACH):
        pass  # the update is now scheduled in the background
    path = engine.save_memory(tmp_path / "m.safetensors")
    assert engine.module.update_count == 1
    header, tensors = read_state(path)
    assert header.update_count == 1 and header.module == "lora_on_user" and header.layer == 2
    assert np.abs(tensors["param.B"]).sum() > 0
    engine.forget()
    assert np.abs(engine.module.state_tensors()["param.B"]).sum() == 0
    engine.load_memory(path)
    np.testing.assert_array_equal(engine.module.state_tensors()["param.B"], tensors["param.B"])
    engine.close()


def test_same_seed_same_state_different_seed_differs(tiny_backend, tmp_path: Path) -> None:
    def run(seed: int) -> dict:
        engine = make_engine("torch", tiny_backend, tmp_path, seed=seed)
        engine.ask(TEACH)
        state = engine.module.state_tensors()
        engine.close()
        return state

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a["param.A"], b["param.A"])
    np.testing.assert_array_equal(a["param.B"], b["param.B"])
    assert not np.array_equal(a["param.A"], c["param.A"])


def test_incognito_makes_no_update(tiny_backend, tmp_path: Path) -> None:
    engine = make_engine("torch", tiny_backend, tmp_path)
    engine.learning = False
    turn = engine.ask(TEACH)
    assert turn.update.skipped == "incognito" and engine.module.update_count == 0
    engine.close()


def test_logging_failure_is_reported_once_and_chat_goes_on(tiny_backend, tmp_path: Path, capsys) -> None:
    engine = make_engine("torch", tiny_backend, tmp_path, activation_log_path=tmp_path)  # a directory
    engine.ask(TEACH)
    engine.ask("what did the cat see")
    engine.close()
    err = capsys.readouterr().err
    assert err.count("event log disabled") == 1


def test_mismatched_state_is_refused_and_untouched(tiny_backend, tmp_path: Path) -> None:
    engine = make_engine("torch", tiny_backend, tmp_path)
    engine.ask(TEACH)
    path = engine.save_memory(tmp_path / "lora.safetensors")
    engine.close()
    before = path.read_bytes()
    other = make_engine("torch", tiny_backend, tmp_path, memory="identity")
    with pytest.raises(StateFileError, match="module 'lora_on_user'.*module 'identity'"):
        other.load_memory(path)
    other.close()
    shifted = make_engine("torch", tiny_backend, tmp_path, layer=1)
    with pytest.raises(StateFileError, match="layer 2.*layer 1"):
        shifted.load_memory(path)
    shifted.close()
    assert path.read_bytes() == before


def test_corrupt_and_foreign_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(StateFileError, match="not a readable safetensors"):
        read_state(junk)
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(foreign))
    with pytest.raises(StateFileError, match="not an lmm state file"):
        read_state(foreign)


def test_interrupted_save_keeps_previous_file(tiny_backend, tmp_path: Path, monkeypatch) -> None:
    engine = make_engine("torch", tiny_backend, tmp_path)
    path = engine.save_memory(tmp_path / "keep.safetensors")
    before = path.read_bytes()
    engine.ask(TEACH)

    def explode(*args, **kwargs):
        Path(args[1]).write_bytes(b"half-written")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, engine.header(), engine.module.state_tensors())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keep")] == []
    engine.close()


def test_layer_out_of_range(tiny_backend, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="out of range"):
        make_engine("torch", tiny_backend, tmp_path, layer=9)


def test_loss_by_decoded_token_suffixes_repeats() -> None:
    assert loss_by_decoded_token([" the", " cat", " the", " the"], [1.0, 2.0, 3.0, 4.0]) == {
        " the": 1.0, " cat": 2.0, " the#2": 3.0, " the#3": 4.0}


def test_two_engines_on_one_backend_each_run_their_own_module(tiny_backend, tmp_path: Path) -> None:
    """Engines share a loaded model; each claims its hook when it runs, so neither reads the other's memory."""
    learner = make_engine("torch", tiny_backend, tmp_path, memory="lora_on_user", memory_options={"lr": "0.05",
                                                                                                    "steps": "3"})
    plain = make_engine("torch", tiny_backend, tmp_path, memory="identity")
    reference = plain.ask("what did the cat see").tokens
    learner.ask(TEACH)
    learned = learner.ask("what did the cat see").tokens
    assert learned != reference  # positive control: the learned memory changes this reply
    plain.reset_chat()
    assert plain.ask("what did the cat see").tokens == reference  # the identity engine runs its own hook
    learner.reset_chat()
    learner.learning = False
    assert learner.ask("what did the cat see").tokens != reference
    learner.close()
    plain.close()


def test_stream_yields_every_token_and_the_finish_reason(tiny_backend, tmp_path: Path) -> None:
    engine = make_engine("torch", tiny_backend, tmp_path, memory="identity")
    pieces = list(engine.stream("the cat sat on the mat"))
    engine.close()
    assert [p.token for p in pieces] == engine.last_turn.tokens and len(pieces) == engine.last_turn.generation_tokens
    assert "".join(p.text for p in pieces).strip() == engine.last_turn.assistant
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == engine.last_turn.finish_reason in ("stop", "length")
