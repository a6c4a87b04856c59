"""N-gram tries: counting, streaming insertion, bounding, persistence, threads."""

from __future__ import annotations

import os
import random
import struct
import threading
import time
import zlib
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trieserve.decoding.trie import DEFAULT_NGRAM_LEN, OutputStore, PromptTrie, TrieNode


def dump(node: TrieNode, prefix: tuple[int, ...] = ()) -> dict[tuple[int, ...], int]:
    """Every path from `node` with its count."""
    out = {}
    for tok, child in (node.children or {}).items():
        out[prefix + (tok,)] = child.count
        out.update(dump(child, prefix + (tok,)))
    return out


def brute_counts(tokens: list[int], ngram_len: int) -> Counter:
    return Counter(
        tuple(tokens[s : s + n]) for s in range(len(tokens)) for n in range(1, ngram_len + 1) if s + n <= len(tokens)
    )


def test_counts_on_a_small_sequence():
    trie = PromptTrie([1, 2, 1, 2, 3], ngram_len=3)
    assert trie.count([1]) == 2 and trie.count([2]) == 2 and trie.count([3]) == 1
    assert trie.count([1, 2]) == 2 and trie.count([2, 1]) == 1 and trie.count([2, 3]) == 1
    assert trie.count([1, 2, 1]) == 1 and trie.count([1, 2, 3]) == 1
    assert trie.count([1, 2, 1, 2]) == 0  # longer than ngram_len
    assert trie.count([4]) == 0 and trie.count([]) == 0
    assert dump(trie.root) == brute_counts([1, 2, 1, 2, 3], 3)
    assert len(trie) == len(dump(trie.root)) == 9


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 6), max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    ngram_len=st.integers(1, 6),
)
def test_incremental_insertion_equals_one_shot(tokens, cuts, ngram_len):
    one_shot = PromptTrie(tokens, ngram_len=ngram_len)
    streamed, store = PromptTrie(ngram_len=ngram_len), OutputStore(capacity=10_000, ngram_len=ngram_len)
    done = 0
    for cut in [*sorted(c for c in cuts if c <= len(tokens)), len(tokens)]:
        streamed.insert(tokens[:cut], done)
        store.insert(tokens[:cut], done)
        done = cut
    expected = brute_counts(tokens, ngram_len)
    assert dump(one_shot.root) == dump(streamed.root) == dump(store.root) == expected
    assert len(one_shot) == len(streamed) == len(store) == len(expected)


def test_step_by_step_streaming_equals_one_shot():
    rnd = random.Random(0)
    tokens = [rnd.randrange(5) for _ in range(300)]
    streamed = PromptTrie(ngram_len=DEFAULT_NGRAM_LEN)
    for i in range(1, len(tokens) + 1):
        streamed.insert(tokens[:i], i - 1)
    assert dump(streamed.root) == dump(PromptTrie(tokens).root)


def test_tensor_tokens_and_bad_ranges():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    trie = PromptTrie(torch.tensor(tokens), ngram_len=4)
    assert dump(trie.root) == dump(PromptTrie(tokens, ngram_len=4).root)
    assert all(type(k) is int for k in trie.root.children)
    with pytest.raises(ValueError, match="new_from"):
        trie.insert(tokens, 9)
    with pytest.raises(ValueError, match="new_from"):
        OutputStore().insert(tokens, -1)
    with pytest.raises(ValueError, match="ngram_len"):
        PromptTrie(ngram_len=0)
    with pytest.raises(ValueError, match="capacity"):
        OutputStore(capacity=10, ngram_len=16)
    with pytest.raises(ValueError, match="decay"):
        OutputStore(decay=1.0)


def best_time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def dict_loop(n: int = 32_000) -> None:
    """A calibration workload: n plain dict stores, to judge timings on a slow or busy machine."""
    d = {}
    for i in range(n):
        d[i] = i


def test_prompt_insertion_is_fast():
    rnd = random.Random(1)
    tokens = [rnd.randrange(32_000) for _ in range(2000)]  # all 32,000 n-grams are new nodes
    took = best_time(lambda: PromptTrie(tokens, ngram_len=16))
    # ~25 ms (8 dict loops) on an idle slow 2-core box. The relative bound keeps a busy machine
    # from flaking the test; an O(n * ngram_len^2) walk (~8x the work) still fails it.
    assert took < 0.1 or took < 40 * best_time(dict_loop), f"2,000-token prompt took {took * 1e3:.0f} ms"


def test_decay_prunes_rare_ngrams_and_keeps_frequent_ones():
    store = OutputStore(capacity=100, ngram_len=4)
    frequent = [1, 2, 3, 4]
    for _ in range(12):
        store.insert(frequent)
    assert store.count(frequent) == 12
    rnd = random.Random(2)
    sizes = []
    while True:
        store.insert([rnd.randrange(100, 10_000) for _ in range(6)])  # ~18 rare nodes each
        sizes.append(len(store))
        if len(sizes) > 1 and sizes[-1] < sizes[-2]:
            break
    assert len(store) <= store.low_water
    assert 0 < store.count(frequent) < 12  # decayed, kept
    assert store.count([1, 2]) >= store.count(frequent)
    rare = [path for path, count in dump(store.root).items() if path[0] >= 100]
    assert len(rare) < 30  # the rare n-grams seen before the prune are gone


def count_nodes(node: TrieNode) -> int:
    return sum(1 + count_nodes(c) for c in (node.children or {}).values())


def test_capacity_is_never_exceeded_under_random_traffic():
    rnd = random.Random(3)
    store = OutputStore(capacity=500, ngram_len=8)
    seqs: list[list[int]] = [[] for _ in range(6)]
    for _ in range(3000):
        seq = seqs[rnd.randrange(len(seqs))]
        old = len(seq)
        seq.extend(rnd.randrange(50) if rnd.random() < 0.5 else rnd.randrange(5) for _ in range(rnd.randint(1, 16)))
        store.insert(seq, old)
        assert len(store) <= 500
        if len(seq) > 200:
            seq.clear()
    assert count_nodes(store.root) == len(store)
    # One long insert that alone would overflow the store many times over.
    store.insert([rnd.randrange(10_000) for _ in range(2000)])
    assert len(store) <= 500 and count_nodes(store.root) == len(store)


def test_save_load_round_trip(tmp_path):
    rnd = random.Random(4)
    store = OutputStore(capacity=50_000, ngram_len=6, tag="toy-tokenizer")
    for _ in range(20):
        store.insert([rnd.randrange(40) for _ in range(50)])
    path = tmp_path / "store.bin"
    store.save(path)
    store.save(path)  # overwriting is fine
    assert os.listdir(tmp_path) == ["store.bin"]  # no temp files left behind
    loaded = OutputStore.from_file(path, capacity=50_000, ngram_len=6, tag="toy-tokenizer")
    assert dump(loaded.root) == dump(store.root) and len(loaded) == len(store)
    assert os.path.getsize(path) < 13 * (len(store) + 1) + 64  # compact: 12 bytes a node
    loaded.insert([1, 2, 3])  # still a working store
    assert loaded.count([1, 2, 3]) == store.count([1, 2, 3]) + 1


def test_a_save_that_fails_midway_leaves_the_old_file_intact(tmp_path, monkeypatch):
    """A crash between writing and renaming (here: os.replace raising) must not corrupt the
    store's file nor leave a temporary file behind."""
    import trieserve.decoding.trie as trie_module

    old = OutputStore(capacity=1000, ngram_len=4, tag="t")
    old.insert([1, 2, 3, 4, 5])
    path = tmp_path / "store.bin"
    old.save(path)
    before = path.read_bytes()
    new = OutputStore(capacity=1000, ngram_len=4, tag="t")
    new.insert([9, 8, 7, 6, 5, 4])

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(trie_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["store.bin"]
    assert dump(OutputStore.from_file(path, capacity=1000, ngram_len=4, tag="t").root) == dump(old.root)


def test_load_prunes_an_oversized_file(tmp_path):
    big = OutputStore(capacity=20_000, ngram_len=4)
    rnd = random.Random(5)
    big.insert([rnd.randrange(1000) for _ in range(3000)])
    big.save(tmp_path / "big.bin")
    small = OutputStore.from_file(tmp_path / "big.bin", capacity=1000, ngram_len=4)
    assert len(small) <= small.low_water and count_nodes(small.root) == len(small)


def corrupt_variants(data: bytes) -> dict[str, bytes]:
    def resealed(body: bytes) -> bytes:
        return body + struct.pack("<I", zlib.crc32(body))

    body = data[:-4]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    bad_version = body[:8] + struct.pack("<I", 99) + body[12:]
    # A structurally broken tree with a valid checksum: the root claims 1000 children.
    header_end = 28 + len(b"tok")
    n = struct.unpack_from("<Q", body, 20)[0]
    kids_at = header_end + 8 * n
    broken = body[:kids_at] + struct.pack("<i", 1000) + body[kids_at + 4 :]
    return {
        "empty": b"",
        "garbage": os.urandom(100),
        "truncated": data[: len(data) // 2],
        "flipped": bytes(flipped),
        "version": resealed(bad_version),
        "structure": resealed(broken),
    }


def test_corrupt_or_incompatible_files_raise_value_error(tmp_path):
    store = OutputStore(capacity=1000, ngram_len=4, tag="tok")
    store.insert([5, 6, 7, 8, 5, 6, 9])
    path = tmp_path / "s.bin"
    store.save(path)
    data = path.read_bytes()
    for name, blob in corrupt_variants(data).items():
        (tmp_path / name).write_bytes(blob)
        target = OutputStore(capacity=1000, ngram_len=4, tag="tok")
        target.insert([1, 2])
        with pytest.raises(ValueError):
            target.load(tmp_path / name)
        assert dump(target.root) == {(1,): 1, (2,): 1, (1, 2): 1}, name  # unchanged
    with pytest.raises(ValueError, match="ngram_len"):
        OutputStore.from_file(path, capacity=1000, ngram_len=5, tag="tok")
    with pytest.raises(ValueError, match="tag"):
        OutputStore.from_file(path, capacity=1000, ngram_len=4, tag="other")


def test_threads_inserting_concurrently_count_exactly():
    """Without pruning, concurrent streaming gives exactly the serial counts."""
    rnd = random.Random(6)
    seqs = [[rnd.randrange(8) for _ in range(400)] for _ in range(4)]
    store = OutputStore(capacity=1_000_000, ngram_len=6)
    errors: list[BaseException] = []

    def stream(seq: list[int]) -> None:
        try:
            for i in range(0, len(seq), 3):
                store.insert(seq[: i + 3], i)
                with store.locked():
                    store.find(seq[i : i + 2])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(s,)) for s in seqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = sum((brute_counts(s, 6) for s in seqs), Counter())
    assert dump(store.root) == expected


def test_threads_with_pruning_stay_bounded_and_consistent():
    store = OutputStore(capacity=400, ngram_len=6)
    errors: list[BaseException] = []

    def stream(seed: int) -> None:
        rnd = random.Random(seed)
        seq: list[int] = []
        try:
            for _ in range(300):
                old = len(seq)
                seq.extend(rnd.randrange(30) for _ in range(rnd.randint(1, 8)))
                store.insert(seq, old)
                assert len(store) <= 400
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert count_nodes(store.root) == len(store) <= 400
