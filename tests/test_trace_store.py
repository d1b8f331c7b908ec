"""trace_bank's store on the tiny random models: what is stored (questions never, each sentence its own
trace), eviction and the byte budget (never silent), restatements, corrections (per reply, or kept as
history when writing), format-1 files upgraded, and the items a person can list, export and forget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from trace_bank_helpers import BACKENDS, FACT, OTHER, UNRELATED, bank, engine, reply, teach

from lmm.backends import DecodingConfig
from lmm.engine import ChatEngine, EngineConfig


@pytest.mark.parametrize("name", BACKENDS)
def test_questions_are_never_stored_and_each_sentence_is_its_own_trace(name: str, tiny_backend) -> None:
    be = tiny_backend(name)
    eng = engine(be)
    try:
        for text in ("What is the capital of France?", "Where do I live?", f"{OTHER} What is my name? {FACT}"):
            teach(eng, text)
        assert [bank(eng)._text(t) for t in bank(eng).traces] == [OTHER, FACT]
    finally:
        eng.close()


@pytest.mark.parametrize("name", BACKENDS)
def test_eviction_bounds_the_count_and_keeps_recently_retrieved_traces(name: str,
                                                                      tiny_backend) -> None:
    be = tiny_backend(name)
    eng = engine(be, max_traces=2, threshold=0.99, sentence_threshold=0.99)
    try:
        teach(eng, FACT)
        teach(eng, OTHER)
        reply(eng, FACT)  # retrieves FACT's trace: it is now the most recently used
        teach(eng, "I work as a baker in Lyon.")
        texts = [bank(eng)._text(t) for t in bank(eng).traces]
        assert len(texts) == 2
        assert any(FACT in t for t in texts) and not any(OTHER in t for t in texts)
        for i in range(5):
            teach(eng, f"My locker number is {100 + 37 * i} and I use it on Mondays.")
            assert len(bank(eng).traces) <= 2
    finally:
        eng.close()


def test_nothing_is_dropped_silently(tiny_backend) -> None:
    """The default keeps far more than the old 256-trace bound; a byte budget drops the least recently
    read traces and the engine says which (the positive control that dropping does happen)."""
    be = tiny_backend("torch")
    eng = engine(be, threshold=0.99, sentence_threshold=0.99, dedupe=1.0)  # only a restatement replaces
    try:
        for i in range(260):
            teach(eng, f"My locker number {i} is at gate {i * 7 + 3}.")
        assert len(bank(eng).traces) == 260 and bank(eng).summary()["full"].endswith("%")
    finally:
        eng.close()
    one = None
    eng = engine(be, threshold=0.99, sentence_threshold=0.99)
    notices: list[str] = []
    eng.set_notice(notices.append)
    try:
        eng.ask(FACT)
        one = bank(eng).stored_bytes()
    finally:
        eng.close()
    eng = engine(be, threshold=0.99, sentence_threshold=0.99, max_bytes=int(one * 2.5))
    eng.set_notice(notices.append)
    try:
        for text in (FACT, OTHER):
            eng.ask(text)
        assert not notices
        update = eng.ask("I work as a baker in Lyon.").update
        assert len(bank(eng).traces) == 2 and update.dropped and FACT.split()[0] in update.dropped[0]
        assert notices and notices[-1].startswith("memory full: dropped 1 least recently read item")
    finally:
        eng.close()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
def test_a_repeated_statement_replaces_its_trace(name: str, dtype: str, tiny_backend) -> None:
    """In every storage form (on the embedded model int4, the default, once kept both copies: its stored
    keys were compared with the new statement's float states; tests/test_integration.py)."""
    be = tiny_backend(name)
    eng = engine(be, dtype=dtype)
    try:
        teach(eng, FACT)
        teach(eng, OTHER)
        teach(eng, FACT)
        assert len(bank(eng).traces) == 2
        assert FACT in bank(eng)._text(bank(eng).traces[-1])  # the newest copy is kept
    finally:
        eng.close()


@pytest.mark.parametrize("supersede", [0.0, 1.0])
def test_a_correction_decided_when_writing_keeps_the_older_as_history(supersede: float, tiny_backend,
                                                                      tmp_path: Path) -> None:
    """supersede_on_write with supersede=0: every new statement replaces the current ones (the older is
    kept, listed as replaced, never read, and current again when the newer is forgotten); supersede=1:
    none does (the positive control that reading both is what happens otherwise)."""
    from lmm.commands import run_command
    from lmm.session import ChatSession

    be = tiny_backend("torch")
    options = {"supersede": supersede, "supersede_sentence": supersede, "supersede_on_write": True}
    eng = engine(be, relevance=-100.0, margin_weight=1.0, dedupe=1.0, read_spread=100.0, **options)
    try:
        teach(eng, "My favourite colour is teal.")
        teach(eng, "My favourite colour is now orange.")
        items = eng.memory_items()
        assert len(items) == 2 and items[1].replaced_by is None
        assert items[0].replaced_by == (2 if supersede == 0.0 else None)
        reply(eng, "What is my favourite colour?")
        assert len(bank(eng).last_route["traces"]) == (1 if supersede == 0.0 else 2)
        listing = run_command(ChatSession(eng), "/memory list").text
        assert ("(replaced by 2)" in listing) == (supersede == 0.0)
        path = eng.save_memory(tmp_path / "m.safetensors")
        other = engine(be, **options)
        other.load_memory(path)
        assert [i.replaced_by for i in other.memory_items()] == [i.replaced_by for i in items]
        other.close()
        eng.forget_item(2)
        assert eng.memory_items()[0].replaced_by is None and len(bank(eng).select("my colour")) == 1
    finally:
        eng.close()


@pytest.mark.parametrize("name", BACKENDS)
def test_a_reply_reads_the_newer_of_two_statements_about_its_subject(name: str, tiny_backend) -> None:
    """By default a correction is decided per message among the statements it reads: the older is left
    out when a newer one said in another message is as relevant and about the same thing; both stay
    stored and listed. Controls: the same two sentences in one message, and supersede=1, read both."""
    be = tiny_backend(name)
    both = {"relevance": -100.0, "margin_weight": 1.0, "dedupe": 1.0, "read_spread": 100.0, "supersede_gap": 1e9}
    older, newer = "My favourite colour is teal.", "My favourite colour is now orange."
    for options, messages, read in (({"supersede": 0.0, "supersede_sentence": 0.0}, [older, newer], [newer]),
                                    ({"supersede": 0.0, "supersede_sentence": 0.0}, [f"{older} {newer}"],
                                     [older, newer]),
                                    ({"supersede": 1.0, "supersede_sentence": 1.0}, [older, newer], [older, newer])):
        eng = engine(be, **both, **options)
        try:
            for text in messages:
                teach(eng, text)
            reply(eng, "What is my favourite colour?")
            assert bank(eng).last_route["traces"] == read
            assert [i.replaced_by for i in eng.memory_items()] == [None, None]
        finally:
            eng.close()


def test_format_1_state_loads_and_upgrades(tiny_backend, tmp_path: Path) -> None:
    """A file of the first trace format (keys/values of every layer, first-person gate options) loads:
    its statements, routing and dates are kept, the keys/values dropped, the options upgraded."""
    import json

    from lmm.state import read_state, save_state

    be = tiny_backend("torch")
    eng = engine(be, threshold=0.99, sentence_threshold=0.99)
    try:
        for text in (FACT, OTHER):
            teach(eng, text)
        path = eng.save_memory(tmp_path / "new.safetensors")
        header, tensors = read_state(path)
        n, lens = 2, tensors["buffer.trace_tokens"]
        old = {k: v for k, v in tensors.items() if k not in ("buffer.trace_format", "buffer.replaced_by",
                                                              "buffer.said_at")}
        old["buffer.keys"] = np.zeros((3, 2, int(lens.sum()), 4), dtype=np.float16)
        old["buffer.values"] = old["buffer.keys"].copy()
        old["buffer.starts"] = np.full(n, 5, dtype=np.int32)
        config = json.loads(header.config)
        config.pop("read_role")
        config.update(scaffold=False, read_gate=True, write_gate=True)
        header.config = json.dumps(config)
        save_state(tmp_path / "old.safetensors", header, old)
        other = engine(be)
        other.load_memory(tmp_path / "old.safetensors")
        assert [i.text for i in other.memory_items()] == [FACT, OTHER]
        assert all(i.said_at is None and i.replaced_by is None for i in other.memory_items())
        assert other.module.config.write_gate == "model" and not hasattr(other.module.config, "scaffold")
        reply(other, FACT)
        assert bank(other).last_route["traces"] == [FACT]
        tensors = other.module.state_tensors()
        assert "buffer.keys" not in tensors and int(tensors["buffer.trace_format"][0]) == 2
        other.close()
        bad = dict(old, **{"buffer.trace_format": np.asarray([9], dtype=np.int32)})
        save_state(tmp_path / "future.safetensors", header, bad)
        with pytest.raises(ValueError, match="trace format 9"):
            other = engine(be)
            try:
                other.load_memory(tmp_path / "future.safetensors")
            finally:
                other.close()
    finally:
        eng.close()


def test_items_can_be_listed_exported_and_forgotten_one_by_one(tiny_backend, tmp_path: Path) -> None:
    """/memory list, /forget N and /memory export on the stored statements; the rest stays and reads."""
    import json

    from lmm.commands import run_command
    from lmm.session import ChatSession

    be = tiny_backend("torch")
    eng = engine(be, threshold=0.99, sentence_threshold=0.99, dedupe=1.0)
    session = ChatSession(eng)
    try:
        for text in (FACT, OTHER, "I work as a baker in Lyon."):
            eng.ask(text)
        listing = run_command(session, "/memory list").text
        assert listing.startswith("3 items, oldest first") and "1  " in listing and "baker" in listing.splitlines()[3]
        assert "3 (/memory list shows them" in dict(run_command(session, "/memory").rows or [])["items"]
        assert run_command(session, "/forget 2").text.startswith("forgot item 2: ") and len(bank(eng).traces) == 2
        assert [item.text for item in eng.memory_items()] == [bank(eng)._text(t) for t in bank(eng).traces]
        assert not any(OTHER.split()[1] in item.text for item in eng.memory_items())
        assert run_command(session, "/forget 9").error
        doc = json.loads(eng.export_memory(tmp_path / "mem.json").read_text())
        assert [i["number"] for i in doc["items"]] == [1, 2] and doc["module"] == "trace_bank"
        assert all(i["said_at"] and i["said_at"].startswith("20") for i in doc["items"])
        # the kept statements survive a save and load, with when they were said
        path = eng.save_memory(tmp_path / "m.safetensors")
        other = engine(be)
        other.load_memory(path)
        assert [i.text for i in other.memory_items()] == [i.text for i in eng.memory_items()]
        assert [i.said_at for i in other.memory_items()] == [i.said_at for i in eng.memory_items()]
        other.close()
    finally:
        eng.close()


def test_weight_modules_say_they_keep_no_items(tiny_backend) -> None:
    from lmm.commands import run_command
    from lmm.session import ChatSession

    eng = ChatEngine(EngineConfig(memory="lora_on_user", activation_log_path=None, background_updates=False,
                                  decoding=DecodingConfig(max_tokens=4)), backend=tiny_backend("torch"))
    try:
        session = ChatSession(eng)
        assert "holds no separate items" in run_command(session, "/memory list").text
        assert "keeps no separate items" in run_command(session, "/forget 1").text
    finally:
        eng.close()


def test_the_whole_turn_index_grows_in_place_and_matches_a_rebuild(tiny_backend) -> None:
    """Appending traces extends the index without rebuilding it; after a deletion it is rebuilt; both
    equal an index built from scratch (the control: a stale index differs after the deletion)."""
    be = tiny_backend("torch")
    eng = engine(be, dedupe=1.0)
    try:
        m = bank(eng)
        for i in range(3):
            teach(eng, f"My locker number {i} is at gate {i * 7 + 3}.")
        buffer = m._sentence_index().base
        for i in range(3, 6):
            teach(eng, f"My locker number {i} is at gate {i * 7 + 3}.")
        grown = m._sentence_index()
        assert grown.base is buffer and len(grown) == 6
        stale = grown.copy()
        m._traces_changed()
        np.testing.assert_allclose(m._sentence_index(), stale, rtol=1e-6)
        eng.forget_item(2)
        rebuilt = m._sentence_index()
        assert len(rebuilt) == 5 and not np.allclose(rebuilt, np.delete(stale, 5, axis=0))
        np.testing.assert_allclose(rebuilt, np.delete(stale, 1, axis=0), rtol=1e-6)
    finally:
        eng.close()


def test_int4_packing_round_trips_within_half_a_step() -> None:
    from lmm.memory.traces import pack4, unpack4

    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    packed, scale = pack4(x)
    assert packed.dtype == np.uint8 and packed.shape == (5, 32) and scale.shape == (5,)
    back = unpack4(packed, scale)
    assert np.all(np.abs(back - x) <= scale[:, None] / 2 + 1e-6)
    assert np.allclose(np.abs(back).max(axis=1), np.abs(x).max(axis=1))  # each row's extreme is exact
    with pytest.raises(ValueError, match="even width"):
        pack4(x[:, :63])


def test_a_file_of_another_storage_is_converted_when_loaded(tiny_backend, tmp_path: Path) -> None:
    """An int8 memory's tensors loaded by a module with dtype=int4 route as before (same selections) and
    are kept in int4; the positive control: the int4 states do differ from the int8 ones. (A file
    loaded by the engine brings its own config, dtype included.)"""
    from safetensors.numpy import load_file

    be = tiny_backend("torch")
    eng = engine(be, dtype="int8")
    questions = ("What is my name?", "What is my cat called?", "Where do I work?")
    try:
        for text in (FACT, OTHER, "I work as a baker in Lyon."):
            teach(eng, text)
        path = eng.save_memory(tmp_path / "int8.safetensors")
        before = [bank(eng).select(q) for q in questions]
        keys8 = bank(eng)._trace_keys(0)
    finally:
        eng.close()
    other = engine(be, dtype="int4")
    try:
        other.module.load_state_tensors({k: v for k, v in load_file(str(path)).items() if k.startswith("buffer.")})
        assert other.module.state_tensors()["buffer.route"].dtype == np.uint8
        assert [bank(other).select(q) for q in questions] == before
        keys4 = bank(other)._trace_keys(0)
        assert keys4.shape == keys8.shape and not np.array_equal(keys4, keys8)
        assert float((keys4 * keys8).sum(axis=1).min()) > 0.95  # same directions, within int4's steps
    finally:
        other.close()


def test_each_turn_says_what_the_memory_read_numbered_as_memory_lists_it(tiny_backend) -> None:
    """TurnResult.read (and `--json`'s "read"): the statements a reply read, by their /memory number;
    a reply that routes nowhere reads nothing; after /forget the numbers follow the new listing."""
    from lmm.memory.base import ReadItem

    be = tiny_backend("torch")
    eng = engine(be, threshold=0.99, sentence_threshold=0.99, dedupe=1.0)
    try:
        for text in ("I work as a baker in Lyon.", OTHER, FACT):
            teach(eng, text)
        eng.reset_chat()
        turn = eng.ask(FACT)
        assert turn.read == [ReadItem(3, FACT)] and bank(eng).last_route["traces"] == [FACT]
        assert turn.to_json()["read"] == [{"item": 3, "text": FACT}]
        eng.forget_item(1)
        eng.reset_chat()
        assert eng.ask(FACT).read == [ReadItem(2, FACT)]
        eng.reset_chat()
        unrouted = eng.ask("Hello! How are you today?")
        assert unrouted.read == [] and not bank(eng).last_route["retrieved"] and unrouted.to_json()["read"] == []
        assert eng.respond([{"role": "user", "content": FACT}], memory=False).read == []
    finally:
        eng.close()


@pytest.mark.parametrize("neighbours", [1, 0])
def test_a_read_statement_brings_its_neighbours_from_the_same_message(tiny_backend, neighbours: int) -> None:
    """A long turn is stored sentence by sentence; reading one reads those next to it from the same
    message (`read_neighbours` each side, within `read_budget`), not those of other messages.
    read_neighbours=0 is the control: the routed statement alone."""
    first, third = "I made a tart for the party.", "Everyone asked me for the recipe."
    be = tiny_backend("torch")
    eng = engine(be, threshold=0.99, sentence_threshold=0.99, read_neighbours=neighbours)
    try:
        teach(eng, OTHER)
        teach(eng, f"{first} {FACT} {third}")
        teach(eng, "I work as a baker in Lyon.")
        reply(eng, FACT)
        assert bank(eng).last_route["traces"] == ([first, FACT, third] if neighbours else [FACT])
        at = [bank(eng)._text(t) for t in bank(eng).traces].index(FACT)
        bank(eng).cfg.read_budget = int(bank(eng).traces.token_counts[at])  # room for the routed one only
        reply(eng, FACT)
        assert bank(eng).last_route["traces"] == [FACT]
    finally:
        eng.close()


def test_a_statement_still_in_the_chat_is_not_read_again_unless_asked_about(tiny_backend) -> None:
    """A message that asks nothing does not read a statement the prompt holds already (said earlier in
    this chat): read twice, it made the model repeat the reply it gave then. Controls: the same message
    in a fresh chat reads it, and so does the chat once the message has left the context window; a
    question may read it (the 135M model answers from a read statement more often than from the chat)."""
    question = FACT.removesuffix(".") + "?"  # the tiny model routes on near-identical tokens only
    be = tiny_backend("torch")
    eng = engine(be, threshold=0.9, sentence_threshold=0.9)
    try:
        teach(eng, OTHER)
        teach(eng, FACT)
        eng.learning = False
        eng.reset_chat()
        assert [i.text for i in eng.ask(FACT).read] == [FACT]  # control: fresh chat, FACT not in the prompt
        assert eng.ask(FACT).read == []  # the previous message holds it
        assert [i.text for i in eng.ask(question).read] == [FACT]  # a question may read it
        eng.reset_chat()
        eng.ask(f"Hi!  {FACT.upper()}  Nice to meet you.")  # inside a longer message, other case and spacing
        assert eng.ask(FACT).read == []
        eng.ask(UNRELATED)
        eng.messages[:] = eng.messages[-2:]  # what the window keeps once the older exchanges are dropped
        assert [i.text for i in eng.ask(FACT).read] == [FACT]
    finally:
        eng.close()


def test_a_sentence_splits_at_its_first_comma_ascii_or_full_width() -> None:
    from lmm.memory.trace_bank import _first_clause

    assert _first_clause("Hi, I'm Ada.") == ("Hi", "I'm Ada.")
    assert _first_clause("Well, so, it is.") == ("Well", "so, it is.")
    assert _first_clause("你好，我是小明。") == ("你好", "我是小明。")  # the full-width comma
    assert _first_clause("No comma here.") == ("No comma here.", "")
    assert _first_clause("Trailing,") == ("Trailing,", "")
