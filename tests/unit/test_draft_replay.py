"""bench/draft_replay.py's oracle bound: the best context-copying chain, on hand-built contexts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("draft_replay", BENCH / "draft_replay.py")
draft_replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(draft_replay)


def test_oracle_chain_takes_the_longest_agreeing_copy_after_the_last_token():
    # the last token 7 occurs at 0 (followed by 1 2 3) and at 4 (followed by 1 2 9)
    context = [7, 1, 2, 3, 7, 1, 2, 9, 5, 7]
    assert draft_replay.oracle_chain(context, [1, 2, 9, 4]) == 3
    assert draft_replay.oracle_chain(context, [1, 2, 3, 7, 8]) == 4
    assert draft_replay.oracle_chain(context, [1, 5]) == 1
    assert draft_replay.oracle_chain(context, [6]) == 0  # nothing follows 7 with 6
    assert draft_replay.oracle_chain([4, 5, 6], [1]) == 0  # the last token occurs only at the end
    # the copy may not run past the context's end
    assert draft_replay.oracle_chain([3, 8, 3], [8, 3, 8]) == 2


def test_replay_oracle_prices_each_chain_by_its_rows():
    # the output repeats the prompt after its first token: one step takes the whole copy
    prompt, output = [5, 1, 2, 3, 4], [5, 1, 2, 3, 4]
    rows = []

    def cost(n: int) -> float:
        rows.append(n)
        return float(n)

    tokens, steps, seconds = draft_replay.replay_oracle([prompt], [output], cost, depth=12)
    # the root row + 3 drafts: the last token is the step's bonus token, never drafted (as in
    # the engine, which drafts no more than the tokens left after the bonus)
    assert (tokens, steps) == (4, 1) and rows == [4] and seconds == 4.0
    # a depth cap of 2 splits it: 2 drafts (+ the bonus token), then the last token alone
    rows.clear()
    tokens, steps, _ = draft_replay.replay_oracle([prompt], [output], cost, depth=2)
    assert tokens == 4 and rows == [3, 1] and steps == 2
