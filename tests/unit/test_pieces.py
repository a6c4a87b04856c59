"""Token bytes and offsets (server/pieces.py) against the real tokenizer's decoding."""

from __future__ import annotations

import pytest
from trieserve.server.pieces import Offsets, TokenPieces, byte_decoder, pieces_for

TEXTS = [
    "Hi 😀 there",
    " 日本語のテキスト, and more: naïve café ☕",
    "def f(x):\n    return x  # ünïcödé\n",
]


def test_byte_decoder_covers_every_byte_once():
    table = byte_decoder()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["!"] == ord("!") and table["Ġ"] == ord(" ")  # GPT-2's stand-in for a space


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_the_decoded_text(tokenizer, text):
    pieces = TokenPieces(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(pieces.bytes(i) for i in ids) == text.encode("utf-8")
    # a single token's decode loses bytes of a split character; its pieces do not
    split = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    if any(ord(ch) > 0xFFFF for ch in text):  # an emoji takes more than one token here
        assert split
    for i in split:
        assert pieces.bytes(i) != tokenizer.decode([i]).encode("utf-8")


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_index_the_decoded_text_with_special_tokens_skipped(tokenizer, text):
    pieces = pieces_for(tokenizer)
    assert pieces_for(tokenizer) is pieces  # one table per tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = ids[:3] + [end] + ids[3:]  # a special token inside: absent from the returned text
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text
    offsets = Offsets(pieces, start=5)
    got = [offsets.next(i) for i in ids]
    assert got == sorted(got) and got[0] == 5
    for k, i in enumerate(ids):
        before = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if not before.endswith("\ufffd"):  # the token starts on a character boundary
            assert got[k] == 5 + len(before)
            piece = pieces.text(i)
            if pieces.visible(i) and "\ufffd" not in piece:
                assert text[got[k] - 5 :].startswith(piece)
        else:  # it starts inside a character: placed at that character
            assert got[k] == 5 + len(before) - 1
    assert offsets.at == 5 + len(text)


def test_every_token_decoding_skips_counts_as_special(tokenizer):
    pieces = TokenPieces(tokenizer)
    ids = tokenizer.encode("hi<file_sep> there", add_special_tokens=False)
    sep = tokenizer.convert_tokens_to_ids("<file_sep>")
    assert sep in ids and sep not in tokenizer.all_special_ids  # added and special, but not named
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi there"
    assert not pieces.visible(sep)
    offsets = Offsets(pieces)
    assert [offsets.next(i) for i in ids][-1] == len("hi")
    assert offsets.at == len("hi there")
    # an echoed prompt keeps its special tokens: they take their width there
    kept = Offsets(pieces, skip_special=False)
    starts = [kept.next(i) for i in ids]
    text = tokenizer.decode(ids)
    assert kept.at == len(text) and text[starts[ids.index(sep)] :].startswith("<file_sep>")
