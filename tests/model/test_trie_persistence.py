"""The shared output trie survives a restart (--trie-path), and a corrupt file starts cold."""

import logging
import queue

from trieserve.decoding.sampling import SamplingParams
from trieserve.server.builder import build_engine
from trieserve.server.sequence import Finish, GenerationRequest
from trieserve.server.settings import Settings


def run(engine, ids, n=24):
    events: queue.Queue = queue.Queue()
    engine.submit(GenerationRequest(ids, n, SamplingParams(temperature=0), lookahead=True), events.put)
    while not isinstance(ev := events.get(timeout=300), Finish):
        pass
    return ev


def test_store_saved_on_stop_and_loaded_on_start(tmp_path, tokenizer):
    path = tmp_path / "store.trie"
    # full draft budget every step: whether a draft pays on this machine's measured costs is the
    # budget's business, not persistence's (a store seen once may not pay on a busy CPU)
    settings = Settings(trie_path=path, decoding_length=8, lookahead=False, adaptive_budget=False)
    ids = tokenizer.encode("Once upon a time, in a land far away, there lived")
    engine, _ = build_engine(settings)
    run(engine, ids)
    nodes = len(engine.speculator.store)
    engine.stop()
    assert nodes > 0 and path.is_file() and path.stat().st_size > 0

    engine, _ = build_engine(settings)
    try:
        assert len(engine.speculator.store) == nodes
        # the restarted server drafts from what it learned before: same prompt, drafts accepted at once
        fin = run(engine, ids)
        assert fin.stats["accepted_tokens"] > 0
    finally:
        engine.stop()


def test_corrupt_store_is_reported_and_ignored(tmp_path, caplog):
    path = tmp_path / "store.trie"
    path.write_bytes(b"this is not a trie store")
    with caplog.at_level(logging.ERROR):
        engine, _ = build_engine(Settings(trie_path=path, decoding_length=8, lookahead=False))
    try:
        assert len(engine.speculator.store) == 0
        assert any("ignoring the trie store" in r.getMessage() for r in caplog.records)
    finally:
        engine.stop()
