"""Token n-gram tries with per-node counts: the draft source of lookahead decoding.

Every n-gram of length 1..ngram_len starting at every position is a path from the root; a
node's count is how many (start, length) occurrences end there. Two stores share the code:

- `PromptTrie`: one per request, built from its prompt, not shared, no lock.
- `OutputStore`: one global store fed with every request's output as it streams; thread-safe,
  bounded in nodes (decay and pruning), saved and loaded for a warm start.

Counts are ints so small ones are CPython's cached objects, and a node without children
carries `None` instead of an empty dict: most nodes are leaves.
"""

from __future__ import annotations

import array
import contextlib
import os
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Sequence

# Drafting matches up to max_match context tokens and then drafts up to branch_length more,
# so tries need n-grams of max_match + branch_length tokens (DraftConfig's defaults: 4 + 12).
DEFAULT_NGRAM_LEN = 16


class TrieNode:
    """count: occurrences of the n-gram this node ends; children: token -> node, None if none."""

    __slots__ = ("count", "children")

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.children: dict[int, TrieNode] | None = None


def _as_list(tokens: Sequence[int]) -> list[int]:
    """Plain ints: a tensor's elements would hash as objects, not token ids."""
    return tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)  # type: ignore[union-attr]


def _subtree_size(node: TrieNode) -> int:
    size, stack = 0, [node]
    while stack:
        n = stack.pop()
        size += 1
        if n.children:
            stack.extend(n.children.values())
    return size


class _Trie:
    """Insertion and lookup shared by both stores. Subclasses decide about locking and size."""

    def __init__(self, ngram_len: int = DEFAULT_NGRAM_LEN) -> None:
        if ngram_len < 1:
            raise ValueError(f"ngram_len must be >= 1, got {ngram_len}")
        self.ngram_len = ngram_len
        self.root = TrieNode()
        self._size = 0  # nodes, root excluded

    def __len__(self) -> int:
        return self._size

    def locked(self) -> contextlib.AbstractContextManager:
        """Hold while reading nodes (drafting). A no-op for a per-request trie."""
        return contextlib.nullcontext()

    def find(self, path: Sequence[int]) -> TrieNode | None:
        """The node reached by `path` from the root, or None. Call under `locked()`."""
        node = self.root
        for tok in path:
            if not node.children:
                return None
            node = node.children.get(tok)
            if node is None:
                return None
        return node

    def count(self, path: Sequence[int]) -> int:
        """Occurrences of the n-gram `path` (0 when absent)."""
        with self.locked():
            node = self.find(path)
            return 0 if node is None or node is self.root else node.count

    def _check_range(self, n: int, new_from: int) -> None:
        if not 0 <= new_from <= n:
            raise ValueError(f"new_from must be in [0, {n}], got {new_from}")

    def _insert(self, seq: list[int], new_from: int, capacity: int | None = None) -> None:
        """Count the n-grams starting anywhere in `seq` that end at index >= new_from; shorter
        ones were counted by an earlier call and are only walked through. With `capacity`, room
        is made before each start (one start adds at most ngram_len nodes)."""
        root, size, span = self.root, self._size, self.ngram_len
        for s in range(len(seq)):
            if capacity is not None and size + span > capacity:
                self._size = size
                self._shrink_locked()
                size = self._size
            node: TrieNode | None = root
            i = s
            while i < new_from:
                children = node.children
                node = children.get(seq[i]) if children else None
                if node is None:
                    break  # the counted prefix was pruned since: its extensions go with it
                i += 1
            if node is None:
                continue
            for tok in seq[i : s + span]:
                children = node.children
                child = None if children is None else children.get(tok)
                if child is None:
                    child = TrieNode(1)
                    if children is None:
                        node.children = {tok: child}
                    else:
                        children[tok] = child
                    size += 1
                else:
                    child.count += 1
                node = child
        self._size = size


class PromptTrie(_Trie):
    """Per-request n-gram trie of the prompt (and anything else the engine streams in)."""

    def __init__(self, tokens: Sequence[int] = (), ngram_len: int = DEFAULT_NGRAM_LEN) -> None:
        super().__init__(ngram_len)
        if len(tokens):
            self.insert(tokens, 0)

    def insert(self, tokens: Sequence[int], new_from: int = 0) -> None:
        """`tokens` is the whole sequence so far, of which tokens[new_from:] are new. Counts each
        (start, length) occurrence once however the sequence is split across calls.
        Cost O((new + ngram_len) * ngram_len) dict steps."""
        self._check_range(len(tokens), new_from)
        first = max(0, new_from - self.ngram_len + 1)
        seq = _as_list(tokens[first:])
        self._insert(seq, new_from - first)


_MAGIC = b"TSTRIE\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sIIIQ")  # magic, version, ngram_len, tag bytes, nodes incl. root
_LITTLE = sys.byteorder == "little"


class OutputStore(_Trie):
    """Global n-gram store of generated text, shared by all requests and threads.

    Bounded: never more than `capacity` nodes. When an insert grows it past `high_water`
    (90%), counts decay (`count = int(count * decay)`) and nodes below `min_count` are pruned
    with their subtrees, round after round, until it is under `low_water` (60%). That pass takes
    the lock one root subtree at a time, so inserts and drafts interleave with it. Should the
    store still reach `capacity` mid-insert, the same pass runs at once under the lock.
    `tag` names what the token ids mean (e.g. the tokenizer); load() refuses another tag.
    """

    def __init__(
        self,
        capacity: int = 500_000,
        ngram_len: int = DEFAULT_NGRAM_LEN,
        decay: float = 0.5,
        min_count: int = 1,
        tag: str = "",
    ) -> None:
        super().__init__(ngram_len)
        if capacity < 4 * ngram_len:
            raise ValueError(f"capacity must be >= 4 * ngram_len = {4 * ngram_len}, got {capacity}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.capacity = capacity
        self.high_water = int(capacity * 0.9)
        self.low_water = int(capacity * 0.6)
        self.decay = decay
        self.min_count = min_count
        self.tag = tag
        self._lock = threading.RLock()  # re-entrant: count() inside locked() must not deadlock
        self._pruning = False

    def locked(self) -> contextlib.AbstractContextManager:
        return self._lock

    def insert(self, tokens: Sequence[int], new_from: int = 0) -> None:
        """Stream `tokens[new_from:]` in (see PromptTrie.insert). Thread-safe."""
        self._check_range(len(tokens), new_from)
        first = max(0, new_from - self.ngram_len + 1)
        seq = _as_list(tokens[first:])
        with self._lock:
            self._insert(seq, new_from - first, self.capacity)
        if self._size > self.high_water:
            self._shrink_incremental()

    # -- bounding ---------------------------------------------------------------------------

    def _decay_prune(self, parent: TrieNode) -> None:
        """Decay every descendant of `parent`; drop those under min_count with their subtrees."""
        decay, min_count = self.decay, self.min_count
        stack = [parent]
        while stack:
            node = stack.pop()
            children = node.children
            if not children:
                continue
            dead = []
            for tok, child in children.items():
                child.count = int(child.count * decay)
                if child.count < min_count:
                    dead.append(tok)
                elif child.children:
                    stack.append(child)
            for tok in dead:
                self._size -= _subtree_size(children.pop(tok))
            if not children:
                node.children = None

    def _decay_root_child(self, tok: int) -> None:
        children = self.root.children
        child = children.get(tok) if children else None
        if child is None:
            return
        child.count = int(child.count * self.decay)
        if child.count < self.min_count:
            self._size -= _subtree_size(children.pop(tok))
        else:
            self._decay_prune(child)

    def _shrink_locked(self) -> None:
        """Decay-and-prune rounds over the whole store until under low_water. Lock held."""
        while self._size > self.low_water:
            self._decay_prune(self.root)

    def _shrink_incremental(self) -> None:
        """Same rounds, taking the lock per root subtree. One thread at a time runs it; counts
        within a subtree stay mutually consistent, which is all drafting compares."""
        with self._lock:
            if self._pruning:
                return
            self._pruning = True
        try:
            while True:
                with self._lock:
                    if self._size <= self.low_water:
                        return
                    keys = list(self.root.children or ())
                for tok in keys:
                    with self._lock:
                        self._decay_root_child(tok)
        finally:
            with self._lock:
                self._pruning = False

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file in the same folder, then os.replace). Format v1, little
        endian: header, tag, then preorder arrays token int32, count uint32, n_children int32
        (root first), then a CRC32 of everything before it. The lock is taken per root subtree."""
        toks, counts, nkids = [-1], [0], [0]
        with self._lock:
            keys = list(self.root.children or ())
        for key in keys:
            with self._lock:
                top = (self.root.children or {}).get(key)
                if top is not None:
                    nkids[0] += 1
                    _flatten(key, top, toks, counts, nkids)
        arrays = (array.array("i", toks), array.array("I", counts), array.array("i", nkids))
        tag = self.tag.encode()
        blobs = [_HEADER.pack(_MAGIC, _VERSION, self.ngram_len, len(tag), len(arrays[0])), tag]
        for arr in arrays:
            if not _LITTLE:
                arr.byteswap()
            blobs.append(arr.tobytes())
        body = b"".join(blobs)
        body += struct.pack("<I", zlib.crc32(body))
        write_atomically(path, body)

    def load(self, path: str | os.PathLike) -> None:
        """Replace the contents with a saved store. ValueError when the file is corrupt or was
        saved with another ngram_len or tag; the store is then left unchanged. Prunes down to
        low_water when the file holds more than capacity allows."""
        root, size = _parse(path, self.ngram_len, self.tag)
        with self._lock:
            self.root, self._size = root, size
            if self._size > self.high_water:
                self._shrink_locked()

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> OutputStore:
        """A new store (kwargs as for the constructor) loaded from `path`; ValueError as load()."""
        store = cls(**kwargs)
        store.load(path)
        return store


def _flatten(tok: int, node: TrieNode, toks: list[int], counts: list[int], nkids: list[int]) -> None:
    """Append the subtree at `node` (reached by `tok`) in preorder."""
    stack = [(tok, node)]
    while stack:
        tok, node = stack.pop()
        toks.append(tok)
        count = node.count
        counts.append(count if count <= 0xFFFFFFFF else 0xFFFFFFFF)
        children = node.children
        if children:
            nkids.append(len(children))
            stack.extend(reversed(children.items()))  # popped in dict order
        else:
            nkids.append(0)


def _parse(path: str | os.PathLike, ngram_len: int, tag: str) -> tuple[TrieNode, int]:
    """Read and check a saved store: returns (root, node count excluding the root)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size + 4 or not data.startswith(_MAGIC):
        raise ValueError(f"{path}: not a trieserve output store")
    if zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise ValueError(f"{path}: checksum mismatch (corrupt or truncated)")
    _, version, file_ngram, tag_len, n = _HEADER.unpack_from(data)
    if version != _VERSION:
        raise ValueError(f"{path}: format version {version}, this build reads {_VERSION}")
    if file_ngram != ngram_len:
        raise ValueError(f"{path}: saved with ngram_len {file_ngram}, store uses {ngram_len}")
    off = _HEADER.size + tag_len
    file_tag = data[_HEADER.size : off].decode(errors="replace")
    if file_tag != tag:
        raise ValueError(f"{path}: saved with tag {file_tag!r}, store uses {tag!r}")
    if n < 1 or len(data) != off + 12 * n + 4:
        raise ValueError(f"{path}: size does not match {n} nodes")
    arrays = []
    for typecode in ("i", "I", "i"):
        arr = array.array(typecode)
        arr.frombytes(data[off : off + 4 * n])
        if not _LITTLE:
            arr.byteswap()
        arrays.append(arr)
        off += 4 * n
    return _rebuild(*arrays, ngram_len=ngram_len, path=path), n - 1


def _rebuild(toks: array.array, counts: array.array, nkids: array.array, ngram_len: int, path) -> TrieNode:
    """Nodes from preorder arrays (root at 0), checking the structure as it goes."""
    n = len(toks)
    if n > 1 and (min(toks[1:]) < 0 or min(counts[1:]) < 1 or min(nkids) < 0):
        raise ValueError(f"{path}: negative token, count below 1 or negative child count")
    toks_l, counts_l, kids_l = toks.tolist(), counts.tolist(), nkids.tolist()  # fast to index
    root = TrieNode()
    nodes, left = [root], [kids_l[0]]  # the open path and how many children each still expects
    for i in range(1, n):
        while left and left[-1] == 0:
            nodes.pop()
            left.pop()
        if not left or len(nodes) > ngram_len:
            raise ValueError(f"{path}: malformed tree at node {i}")
        left[-1] -= 1
        parent, tok = nodes[-1], toks_l[i]
        node = TrieNode(counts_l[i])
        if parent.children is None:
            parent.children = {tok: node}
        elif tok in parent.children:
            raise ValueError(f"{path}: duplicate child token {tok} at node {i}")
        else:
            parent.children[tok] = node
        nodes.append(node)
        left.append(kids_l[i])
    if any(left):
        raise ValueError(f"{path}: tree ends early")
    return root


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so a reader (or a crash) sees the old file or the new one, never a
    torn one: a unique temporary file in the same folder, fsync, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
