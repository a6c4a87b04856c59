"""Each token's own bytes and where it starts in the decoded text, for logprobs responses.

Decoding one token id on its own is wrong for both: a token that holds part of a multi-byte
character decodes to U+FFFD, and SentencePiece drops a lone token's leading space. The pieces
come from the vocabulary instead: byte-level BPE (GPT-2 style, SmolLM2's) maps every byte to a
printable character, SentencePiece spells raw bytes `<0xNN>` and a space `▁`. Concatenated, the
bytes of the non-special tokens are the text that decoding with `skip_special_tokens` returns, so
character offsets follow from an incremental UTF-8 decoder (a token that starts inside a
character is placed at that character).
"""

from __future__ import annotations

import codecs
import re
import weakref
from functools import lru_cache

_RAW_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenPieces:
    """Per-tokenizer table of token bytes (cached: logprobs ask for the same ids again and again)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        # what decoding with skip_special_tokens drops: the named special tokens and every added
        # token marked special (SmolLM2's <file_sep>, <filename>, ... are not among the named ones)
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special = set(tokenizer.all_special_ids) | {i for i, t in decoder.items() if getattr(t, "special", False)}
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = self._lookup(token_id)
        return found

    def _lookup(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.special or not isinstance(piece, str):
            return self.tokenizer.decode([token_id]).encode("utf-8")
        raw = _RAW_BYTE.fullmatch(piece)
        if raw:
            return bytes([int(raw.group(1), 16)])
        table = byte_decoder()
        if "▁" not in piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return piece.replace("▁", " ").encode("utf-8")

    def text(self, token_id: int) -> str:
        """The token as a string (an incomplete character shows as U+FFFD; `bytes` has it all)."""
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def visible(self, token_id: int) -> bool:
        """Whether the token is part of the returned text (special tokens are skipped)."""
        return token_id not in self.special


_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pieces_for(tokenizer) -> TokenPieces:
    """The one `TokenPieces` of this tokenizer."""
    table = _tables.get(tokenizer)
    if table is None:
        table = _tables[tokenizer] = TokenPieces(tokenizer)
    return table


class Offsets:
    """Character offsets of tokens in a text decoded from them, token by token across calls."""

    def __init__(self, pieces: TokenPieces, start: int = 0, skip_special: bool = True) -> None:
        self.pieces = pieces
        self.at = start
        self.skip_special = skip_special  # False for text decoded with its special tokens (an echoed prompt)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token_id: int) -> int:
        """Where `token_id` starts; moves past it."""
        here = self.at
        if not self.skip_special or self.pieces.visible(token_id):
            self.at += len(self._decoder.decode(self.pieces.bytes(token_id)))
        return here
