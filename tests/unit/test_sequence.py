"""Stop strings, EOS and max_tokens on the real tokenizer (no model)."""

from trieserve.decoding.sampling import SamplingParams
from trieserve.server.sequence import Delta, Finish, GenerationRequest, Sequence, TextTracker


def make_seq(tokenizer, stop=(), max_tokens=100, eos=frozenset({2})):
    events = []
    req = GenerationRequest(
        prompt_ids=[1], max_tokens=max_tokens, params=SamplingParams(temperature=0), stop=list(stop)
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
