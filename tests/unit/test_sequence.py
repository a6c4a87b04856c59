"""Stop strings, EOS and max_tokens on the real tokenizer (no model)."""

import pytest
import torch
from trieserve.decoding.sampling import SamplingParams, token_logprobs
from trieserve.server.sequence import Delta, Finish, GenerationRequest, Sequence, TextTracker


def make_seq(tokenizer, stop=(), max_tokens=100, eos=frozenset({2}), logprobs=None):
    events = []
    req = GenerationRequest(
        prompt_ids=[1],
        max_tokens=max_tokens,
        params=SamplingParams(temperature=0),
        stop=list(stop),
        logprobs=logprobs,
    )
    return Sequence(req, tokenizer, set(eos), events.append), events


def test_stop_string_across_tokens_truncates_text_and_tokens(tokenizer):
    ids = tokenizer.encode(" alpha beta gamma delta", add_special_tokens=False)
    seq, events = make_seq(tokenizer, stop=["ta gam"])
    used = seq.append(ids)
    assert seq.finish_reason == "stop"
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert text == " alpha be"
    assert used < len(ids) and seq.output_ids == ids[:used]


def test_text_held_back_until_safe(tokenizer):
    tracker = TextTracker(tokenizer, ["STOP"])
    for tok in tokenizer.encode("hello there", add_special_tokens=False):
        tracker.add(tok)
    partial = tracker.pending(final=False)
    assert "hello there".startswith(partial) and len(partial) <= len("hello there") - 3
    assert partial + tracker.pending(final=True) == "hello there"


def test_every_token_reaches_a_delta_even_when_its_text_is_held_back(tokenizer):
    """A token whose text waits (a possible stop string's start, half of a multi-byte character)
    travels with the next text that is sent: the Deltas' token ids are the whole output."""
    tokens = tokenizer.encode(" ok 🙂 fine alpha beta", add_special_tokens=False)
    seq, events = make_seq(tokenizer, stop=["beta gamma"], max_tokens=len(tokens))
    for tok in tokens:
        seq.append([tok])
    assert seq.finish_reason == "length"
    deltas = [e for e in events if isinstance(e, Delta)]
    assert len(deltas) < len(tokens)  # some tokens' text was held back ...
    assert [t for e in deltas for t in e.token_ids] == seq.output_ids == tokens  # ... not their ids
    assert "".join(e.text for e in deltas) == " ok 🙂 fine alpha beta"


def test_eos_inside_accepted_chunk_stops_there(tokenizer):
    a = tokenizer.encode(" yes", add_special_tokens=False)
    seq, events = make_seq(tokenizer)
    used = seq.append(a + [2] + a)
    assert used == len(a) + 1 and seq.finish_reason == "stop"
    seq.finish()
    fin = events[-1]
    assert isinstance(fin, Finish) and fin.completion_tokens == len(a) + 1


def test_max_tokens_cuts_chunk(tokenizer):
    seq, _ = make_seq(tokenizer, max_tokens=3)
    assert seq.append([100, 101, 102, 103, 104]) == 3
    assert seq.finish_reason == "length" and seq.output_ids == [100, 101, 102]


def test_token_logprobs_against_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.5, 0.0, 5.0, -1.0]])
    out = token_logprobs(logits, [1, 3], top=2)
    lp = torch.log_softmax(logits, -1)
    assert [o.token for o in out] == [1, 3]
    assert out[0].logprob == pytest.approx(float(lp[0, 1])) and out[1].logprob == pytest.approx(float(lp[1, 3]))
    assert [t for t, _ in out[0].top] == [2, 1] and out[0].top[0][1] == pytest.approx(float(lp[0, 2]))
    assert [t for t, _ in out[1].top] == [2, 0]
    assert token_logprobs(logits, [2], top=0)[0].top == ()  # rows past the tokens are not read


def test_logprobs_travel_with_their_text_and_stop_with_the_tokens(tokenizer):
    ids = tokenizer.encode(" alpha beta gamma delta", add_special_tokens=False)
    vocab = len(tokenizer)
    logits = torch.randn(len(ids), vocab, generator=torch.Generator().manual_seed(0))
    seq, events = make_seq(tokenizer, stop=["ta gam"], logprobs=1)
    # one token at a time: text held back as a possible stop string keeps its logprobs with it
    used = sum(seq.append([tok], logits[i : i + 1]) for i, tok in enumerate(ids) if not seq.done)
    deltas = [e for e in events if isinstance(e, Delta)]
    got = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token for lp in got] == ids[:used] == seq.output_ids
    for d in deltas:  # a Delta carries the logprobs of tokens whose text it is (or is part of)
        assert d.logprobs or not d.text
    assert [lp.logprob for lp in got] == pytest.approx(
        [float(torch.log_softmax(logits[i], -1)[ids[i]]) for i in range(used)]
    )
    # without the request asking, no logprobs are computed or sent
    seq, events = make_seq(tokenizer)
    seq.append(ids, logits)
    assert all(e.logprobs is None for e in events if isinstance(e, Delta))


def test_min_tokens_ignores_a_stop_string_completed_before_it_for_good(tokenizer):
    ids = tokenizer.encode("Yes.\nMaybe later, perhaps.\nNo", add_special_tokens=False)
    events = []
    req = GenerationRequest(
        prompt_ids=[1], max_tokens=100, params=SamplingParams(temperature=0, min_tokens=4), stop=["\n"]
    )
    seq = Sequence(req, tokenizer, {2}, events.append)
    for tok in ids:  # one token per step, as plain decoding appends them
        seq.append([tok])
        if seq.done:
            break
    text = "".join(e.text for e in events if isinstance(e, Delta))
    # the first newline came before min_tokens and does not count, then or later; the second ends it
    assert seq.finish_reason == "stop" and text == "Yes.\nMaybe later, perhaps."
    assert seq.params.min_tokens == 0  # the ban is over: plain parameters again


def test_merged_stats_of_n_choices():
    """An n > 1 request's stats: the longest choice's forwards and times, summed drafts, and the
    KV figures of the choice that had seen the most at its last eviction (kv_regrow)."""
    from trieserve.server.api import _merged_stats
    from trieserve.server.sequence import Stats

    def finish(tokens, forwards, kv_total, kv_kept, evictions, drafted):
        stats = Stats(forward_passes=forwards, draft_tokens=drafted, kv_tokens_total=kv_total)
        stats.kv_tokens_kept, stats.kv_evictions, stats.cached_tokens = kv_kept, evictions, 64
        return Finish("length", 300, tokens, stats.as_dict(tokens))

    early = finish(10, 11, 300, 60, 1, 4)  # ended before its first re-eviction
    late = finish(80, 70, 364, 73, 3, 6)
    merged = _merged_stats([early, late])
    assert merged["forward_passes"] == 70 and merged["draft_tokens"] == 10
    assert (merged["kv_tokens_total"], merged["kv_tokens_kept"], merged["kv_evictions"]) == (364, 73, 3)
    assert merged["cached_prompt_tokens"] == 64
    assert merged["tokens_per_forward"] == round(90 / 81, 4)


def test_a_cancelled_sequence_sends_its_held_back_text_and_tokens_before_it_ends(tokenizer):
    tokens = tokenizer.encode(" alpha beta", add_special_tokens=False)
    seq, events = make_seq(tokenizer, stop=["beta gamma"])
    seq.append(tokens)  # " beta" could start the stop string: held back
    held = "".join(e.text for e in events)
    assert held != " alpha beta"
    seq.finish("cancelled")
    assert isinstance(events[-1], Finish) and events[-1].reason == "cancelled"
    deltas = [e for e in events if isinstance(e, Delta)]
    assert "".join(e.text for e in deltas) == " alpha beta"
    assert [t for e in deltas for t in e.token_ids] == tokens
