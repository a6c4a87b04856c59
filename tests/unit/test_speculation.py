"""The adaptive draft budget: cost interpolation and batch allocation (no model)."""

import pytest
from trieserve.server.budget import StepCost, allocate


def test_step_cost_interpolates_and_extrapolates():
    cost = StepCost([1, 4, 16], [1.0, 1.3, 2.5])
    assert cost(1) == 1.0 and cost(16) == 2.5
    assert cost(2) == pytest.approx(1.1)
    assert cost(32) == pytest.approx(5.0)  # beyond the ladder: proportional


def test_step_cost_online_update_is_damped():
    cost = StepCost([1, 4], [1.0, 2.0])
    cost.observe(1, 100.0)  # one step slowed 100x by outside load
    assert cost(1) < 1.1


def test_no_draft_when_forward_cost_grows_fast():
    cpu = StepCost([1, 2, 4, 8, 16], [1.0, 1.9, 3.5, 7.0, 14.0])
    assert allocate([[0.3, 0.2, 0.1]], cpu) == [0]


def test_confident_drafts_pay_on_flat_costs():
    gpu = StepCost([1, 2, 4, 8, 16, 32, 64], [1.0] * 6 + [1.1])
    keep = allocate([[0.9, 0.8, 0.7, 0.01], [0.5, 0.4]], gpu)
    assert keep == [4, 2]  # flat cost: every node is worth its row


def test_batch_allocation_spends_rows_on_the_best_nodes_of_the_whole_batch():
    cost = StepCost([1, 2, 5, 8], [1.0, 1.0, 1.06, 2.0])
    # 3 + n rows: n=2 (0.9 and 0.8) costs 1.06 for 1.7 more tokens; a third node (0.7) would
    # take the step to 6 rows, 1.37
    keep = allocate([[0.9, 0.05], [0.8, 0.7], []], cost)
    assert keep == [1, 1, 0]


def test_batch_allocation_keeps_each_sequence_s_order():
    flat = StepCost([1, 64], [1.0, 1.0])
    # sequence 0's second node is worth more than its first (a ranking quirk), but a node comes
    # only after the ones ranked above it: with room for two, the picks are 0.6 then 0.5
    keep = allocate([[0.5, 0.9], [0.6]], flat, limit=2)
    assert keep == [1, 1]
    # with room for one, sequence 0's 0.9 is out of reach (it needs the 0.5 first): 0.6 wins
    assert allocate([[0.5, 0.9], [0.6]], flat, limit=1) == [0, 1]
    assert allocate([[0.5, 0.9], [0.6]], flat, limit=3) == [2, 1]


def test_batch_allocation_respects_the_step_limit():
    flat = StepCost([1, 64], [1.0, 1.0])
    keep = allocate([[0.9] * 10, [0.8] * 10, [0.7] * 10], flat, limit=12)
    assert sum(keep) == 12 and keep == [10, 2, 0]


def test_one_drafting_sequence_pays_for_its_own_rows_in_a_big_batch():
    """The flattened batch: one good tree in a batch of eight costs its own rows only (not one
    row per sequence per tree row), so it still drafts; a poor tree does not."""
    cpu = StepCost([1, 2, 4, 8, 16, 32, 64, 128], [1.0, 1.2, 1.4, 1.8, 2.4, 3.6, 6.0, 11.0])
    good = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5]
    assert allocate([good], cpu)[0] >= 4
    keep = allocate([good] + [[]] * 7, cpu)
    assert keep[0] >= 4 and keep[1:] == [0] * 7
    poor = [0.1, 0.05, 0.02]
    assert allocate([poor] + [[]] * 7, cpu) == [0] * 8
    # every sequence with a good tree: the rows go to the best nodes across the batch
    keep = allocate([good] * 8, cpu)
    assert min(keep) >= 1 and max(keep) - min(keep) <= 1


def test_new_sequences_start_from_the_server_wide_calibration():
    from types import SimpleNamespace

    from trieserve.decoding.draft import DraftConfig
    from trieserve.decoding.trie import OutputStore
    from trieserve.server.speculation import Speculator

    config = DraftConfig()
    spec = Speculator(OutputStore(capacity=1000, ngram_len=config.ngram_len), config, 8, StepCost([1], [1.0]))

    def admitted():
        seq = SimpleNamespace(prompt_ids=[1, 2, 3, 4], state={})
        spec.admit(seq)
        return seq.state["lookahead"].calibration

    assert admitted().rate(0.9, 1) == 0.9  # nothing learned anywhere: the drafter's own estimate
    for _ in range(200):
        spec.prior.observe(0.9, 1, hit=False)  # "certain" first tokens have kept failing everywhere
    cal = admitted()
    assert cal.rate(0.9, 1) < 0.01 and cal.rate(0.9, 2) == 0.9
    for _ in range(20):
        cal.observe(0.9, 1, hit=True)  # this sequence copies: it earns its own rate back
    assert cal.rate(0.9, 1) > 0.9 and admitted().rate(0.9, 1) < 0.01


def test_node_calibration_scores_whole_trees_against_the_tokens_that_followed():
    """Every node is scored once: a hit when its path is the committed text, a miss as soon as
    the text leaves its path (even before the text reaches its depth), undecided until then."""
    from trieserve.decoding.tree import DraftTree
    from trieserve.server.budget import NodeCalibration

    # root -> 1 (0.9) -> 2 (0.8) -> 3 (0.5);  root -> 1 -> 4 (0.1);  root -> 7 (0.05) -> 8 (0.04)
    tree = DraftTree(tokens=[1, 2, 3, 4, 7, 8], parents=[-1, 0, 1, 0, -1, 4], probs=[0.9, 0.8, 0.5, 0.1, 0.05, 0.04])
    cal = NodeCalibration(alpha=1.0)  # each observation replaces its cell's rate: easy to read
    done = [False] * 6
    assert not cal.observe_tree(tree, [1], done)
    # depth 1 decided: 1 hit, 7 missed and so did its child 8; 2, 3 and 4 wait for more text
    assert done == [True, False, False, False, True, True]
    assert cal.rate(0.9, 1) == 1.0 and cal.rate(0.05, 1) == 0.0 and cal.rate(0.04, 2) == 0.0
    assert cal.rate(0.8, 2) == 0.8  # not seen yet: the estimate
    assert cal.observe_tree(tree, [1, 2, 9], done)  # 2 hit, 4 and 3 missed: all decided
    assert cal.rate(0.8, 2) == 1.0 and cal.rate(0.1, 2) == 0.0 and cal.rate(0.5, 3) == 0.0
    version = cal.version
    assert cal.observe_tree(tree, [1, 2, 9, 5], done) and cal.version == version  # nothing scored twice


def test_calibrated_trees_rank_by_learned_rates_and_keep_whole_paths():
    from trieserve.decoding.draft import accepted_curve
    from trieserve.decoding.tree import DraftTree
    from trieserve.server.budget import NodeCalibration

    cal = NodeCalibration(alpha=1.0)
    cal.observe(0.9, 1, hit=False)  # the counts' "certain" first tokens fail here...
    cal.observe(0.2, 1, hit=True)  # ...and their modest ones land
    cal.observe(0.9, 2, hit=True)
    tree = DraftTree(tokens=[1, 2, 3], parents=[-1, 0, -1], probs=[0.9, 0.9, 0.2])
    out = cal.calibrated(tree)
    assert out.probs == [0.0, 0.0, 1.0]  # a child never above its parent
    assert out.top(1).tokens == [3]
    assert accepted_curve(out) == [0.0, 1.0, 1.0, 1.0]
    # the upper bound the budget's quick check uses: the best rate any node could get per depth
    assert cal.best_by_depth(3) == [1.0, 1.0, 1.0]
    for p in (0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0):
        cal.observe(p, 3, hit=False)
    assert cal.best_by_depth(3)[2] == 0.0


def test_calibration_keys_on_the_match_length_and_backs_off_when_a_cell_is_new():
    from trieserve.decoding.tree import DraftTree
    from trieserve.server.budget import NodeCalibration

    prior = NodeCalibration(alpha=1.0)
    prior.observe(0.9, 1, hit=False, matched=1)  # found on one token: missed
    prior.observe(0.9, 1, hit=True, matched=4)  # found on four: landed
    assert prior.rate(0.9, 1, matched=1) == 0.0 and prior.rate(0.9, 1, matched=5) == 1.0
    # a match length not seen at this estimate takes the rate of any match length there (the
    # last outcome, with alpha 1), and an estimate never seen is its own rate
    assert prior.rate(0.9, 1, matched=2) == 1.0
    assert prior.rate(0.3, 1, matched=2) == 0.3
    # a sequence's calibration backs off to the server-wide one, cell by cell
    seq = NodeCalibration(alpha=1.0, fallback=prior)
    seq.observe(0.9, 1, hit=True, matched=1)
    assert seq.rate(0.9, 1, matched=1) == 1.0 and prior.rate(0.9, 1, matched=1) == 0.0
    tree = DraftTree(tokens=[1, 2], parents=[-1, -1], probs=[0.9, 0.9], matched=[4, 1])
    assert prior.calibrated(tree).probs == [1.0, 0.0] and prior.calibrated(tree).matched == [4, 1]
    # scoring a tree learns each node under its own match length
    fresh = NodeCalibration(alpha=1.0)
    assert fresh.observe_tree(tree, [2])
    assert fresh.rate(0.9, 1, matched=4) == 0.0 and fresh.rate(0.9, 1, matched=1) == 1.0
    with pytest.raises(ValueError, match="match lengths"):
        DraftTree(tokens=[1], parents=[-1], probs=[1.0], matched=[1, 2]).validate()


def test_best_by_depth_bounds_every_match_length():
    """The quick check's bound sees a learned per-match cell that beats its (depth, estimate) rate."""
    from trieserve.server.budget import PROB_EDGES, NodeCalibration

    cal = NodeCalibration(alpha=1.0)
    cal.observe(0.9, 1, hit=True, matched=4)
    cal.observe(0.9, 1, hit=False, matched=1)  # the rate over any match length is now 0
    for p in (0.0, *PROB_EDGES):  # every other depth-1 cell has failed
        for matched in (0, 1, 2, 4):
            if (p, matched) != (0.9, 4) and NodeCalibration.cell(p, 1, matched) != cal.cell(0.9, 1, 4):
                cal.observe(p, 1, hit=False, matched=matched)
    assert cal.rate(0.9, 1, matched=1) == 0.0 and cal.coarse[cal.cell(0.9, 1)[:2]] == 0.0
    assert cal.best_by_depth(1) == [1.0]  # the four-token cell
    cal.observe(0.9, 1, hit=False, matched=4)
    assert cal.best_by_depth(2)[0] == 0.0 and cal.best_by_depth(2)[1] > 0.0  # depth 2: not learned


def test_no_trie_search_when_no_draft_could_pay_for_the_batch():
    """Eight sequences whose drafts have kept failing, on a CPU where padding the batch to two
    rows per sequence costs 1.4x: even perfect trees would lose, so the step drafts nothing,
    without searching the tries; every sequence's new output reaches the shared store at its next
    search or when it ends.
    Alone, with a good calibration, the same sequence drafts."""
    from types import SimpleNamespace

    from trieserve.decoding.draft import DraftConfig
    from trieserve.decoding.trie import OutputStore
    from trieserve.server.speculation import Speculator

    config = DraftConfig()
    cost = StepCost([1, 2, 4, 8, 16, 32, 64], [1.0, 1.05, 1.2, 1.5, 2.1, 2.5, 4.0])
    spec = Speculator(OutputStore(capacity=1000, ngram_len=config.ngram_len), config, 16, cost)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12] * 4

    def sequence():
        seq = SimpleNamespace(prompt_ids=prompt, output_ids=[5, 6, 7], state={}, lookahead=True,
                              request=SimpleNamespace(max_tokens=64), max_context=2048, logical_len=35, evict_at=None)  # fmt: skip
        spec.admit(seq)
        return seq

    searched = []
    spec.draft_for = lambda seq, orig=spec.draft_for: searched.append(seq) or orig(seq)
    batch = [sequence() for _ in range(8)]
    for seq in batch:  # every kind of node has landed 1 time in 10
        cal = seq.state["lookahead"].calibration
        for depth in range(1, config.branch_length + 1):
            for p in (0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0):
                for matched in (0, 1, 2, 4):  # every match-length bucket
                    cal.rates[cal.cell(p, depth, matched)] = 0.1
        cal.version += 1  # rates written directly: best_by_depth must see them
    assert [len(t) for t in spec.plan(None, batch)] == [0] * 8
    assert searched == []
    assert spec.store.find([5, 6]) is None  # not yet streamed: no search ran
    spec.release(batch[0])
    assert spec.store.find([5, 6]) is not None
    alone = sequence()
    assert len(spec.plan(None, [alone])[0]) > 0
    assert searched == [alone]
    # the payoff check guards batched steps only: a lone request drafts even where its batch
    # size's record says drafting lost
    for _ in range(4):
        spec.payoff.observe(1, drafted=False, tokens=1, seconds=0.1)
        spec.payoff.observe(1, drafted=True, tokens=1, seconds=0.3)
    assert spec.payoff.rates(1)[1] < spec.payoff.rates(1)[0]
    assert all(len(spec.plan(None, [alone])[0]) > 0 for _ in range(3))


def test_payoff_switches_drafting_off_where_it_loses_but_keeps_exploring():
    from trieserve.server.budget import Payoff

    payoff = Payoff(explore=4, max_explore=16)
    assert payoff.allows(8)  # nothing seen yet
    for _ in range(20):
        payoff.observe(8, drafted=False, tokens=8, seconds=0.2)  # 40 tok/s plain
        payoff.observe(1, drafted=False, tokens=1, seconds=0.1)  # 10 tok/s plain
        payoff.observe(1, drafted=True, tokens=3, seconds=0.12)  # 25 tok/s drafting
    payoff.observe(8, drafted=True, tokens=9, seconds=0.3)  # 30 tok/s drafting: a loss
    assert payoff.rates(8) == pytest.approx((40.0, 30.0))
    allowed = []
    for _ in range(64):  # each exploring step confirms the loss: the wait doubles, 8 then 16 (the cap)
        allowed.append(payoff.allows(8))
        if allowed[-1]:
            payoff.observe(8, drafted=True, tokens=9, seconds=0.3)
    assert [i for i, a in enumerate(allowed) if a] == [7, 23, 39, 55]
    assert all(payoff.allows(1) for _ in range(8))  # where drafting wins it is never held back
    for _ in range(60):  # the workload changes: drafting now wins at 8 too
        payoff.observe(8, drafted=True, tokens=20, seconds=0.3)
    assert payoff.allows(8) and payoff.allows(8)
    assert payoff.wait[8] == 4  # and a later loss starts exploring at the short wait again


def test_draft_rows_riding_on_a_prefill_chunk_cost_little():
    """A forward that carries a 64-row prefill chunk anyway makes a modest tree worth its rows
    where, in a bare one-row step on the same cost curve, it is not."""
    cpu = StepCost([1, 2, 4, 8, 16, 32, 64, 128], [1.0, 1.9, 2.0, 2.2, 2.6, 3.6, 6.0, 11.0])
    modest = [0.3, 0.2, 0.1]
    assert allocate([modest], cpu) == [0]
    assert allocate([modest], cpu, extra_rows=64)[0] >= 1


def test_a_margin_blocks_near_break_even_drafts_only():
    flat8 = StepCost([1, 8, 16], [1.0, 1.6, 2.0])
    # 8 plain rows: 5 tok/s-units; two nodes (0.9 + 0.8 of a token) on 10 rows cost 1.7: 5.71 (+14%)
    near = [[0.9, 0.8]] + [[]] * 7
    assert sum(allocate(near, flat8)) == 2
    assert sum(allocate(near, flat8, margin=0.1)) == 2  # 14% clears a 10% margin
    assert sum(allocate(near, flat8, margin=0.2)) == 0  # not a 20% one
    weak = [[0.5]] + [[]] * 7  # 8.5 / 1.65 = 5.15: +3%, a break-even bet
    assert sum(allocate(weak, flat8)) == 1 and sum(allocate(weak, flat8, margin=0.1)) == 0


def test_batched_drafts_are_discounted_by_how_far_verified_trees_fell_short():
    """Verified trees accepting a quarter of their estimate make a batch draft less; a lone
    request's budget is left as it is."""
    from types import SimpleNamespace

    from trieserve.decoding.draft import DraftConfig
    from trieserve.decoding.trie import OutputStore
    from trieserve.server.speculation import Speculator

    config = DraftConfig()
    cost = StepCost([1, 2, 4, 8, 16, 32, 64], [1.0, 1.0, 1.3, 1.8, 3.0, 5.0, 9.0])
    spec = Speculator(OutputStore(capacity=1000, ngram_len=config.ngram_len), config, 32, cost)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18] * 3

    def sequence():
        seq = SimpleNamespace(prompt_ids=prompt, output_ids=[5, 6, 7], state={}, lookahead=True,
                              request=SimpleNamespace(max_tokens=64), max_context=2048, logical_len=45, evict_at=None)  # fmt: skip
        spec.admit(seq)
        return seq

    def sizes(seqs):
        return [len(t) for t in spec.plan(None, seqs)]

    batch = [sequence(), sequence()]
    trusted, alone = sizes(batch), sizes([batch[0]])
    assert min(trusted) > 0
    for _ in range(300):
        spec.settle(batch[0], accepted=0)  # trees keep falling short of their estimates
    assert spec.realism[0] < 0.25 * spec.realism[1]
    assert sum(sizes(batch)) < sum(trusted)
    assert sizes([batch[0]]) == alone


def test_drafted_trees_are_scored_against_the_tokens_that_follow_them():
    """The wiring: a tree drafted in `plan` is kept with the output index of its first token
    and scored once the sequence commits tokens (here at `release`), into the sequence's and
    the server-wide rates."""
    from types import SimpleNamespace

    from trieserve.decoding.draft import DraftConfig
    from trieserve.decoding.trie import OutputStore
    from trieserve.server.speculation import Speculator

    config = DraftConfig()
    spec = Speculator(OutputStore(capacity=1000, ngram_len=config.ngram_len), config, 16, StepCost([1, 64], [1.0, 1.0]))
    prompt = [5, 6, 7, 8, 9, 10, 11, 12] * 4
    seq = SimpleNamespace(prompt_ids=prompt, output_ids=[5, 6, 7], state={}, lookahead=True,
                          request=SimpleNamespace(max_tokens=64), max_context=2048, logical_len=35, evict_at=None)  # fmt: skip
    spec.admit(seq)
    tree = spec.plan(None, [seq])[0]
    assert len(tree) and tree.tokens[0] == 8  # the prompt continues 5 6 7 with 8
    ((start, full, _),) = seq.state["lookahead"].pending
    assert start == 3 and full.tokens[0] == 8
    cal = seq.state["lookahead"].calibration
    seq.output_ids += [8, 42]  # the model took the draft's first token, then left it
    spec.plan(None, [seq])  # scores what is known so far, before drafting again
    assert cal.rate(full.probs[0], 1) == 1.0
    assert cal.rate(full.probs[1], 2) < full.probs[1]  # 9 was drafted at depth 2, 42 came
    spec.release(seq)
    assert spec.prior.rates and "lookahead" not in seq.state


def test_batched_steps_do_not_move_the_ladder_but_price_draft_rows():
    """Plain 8-sequence steps are dearer than 8 ladder rows (attention per sequence); that must
    not lift the 8-row point above the 10-row one, or draft rows would look free in a batch."""
    cost = StepCost([1, 8, 10, 32], [1.0, 1.2, 1.4, 2.2])
    for _ in range(200):
        cost.observe(8, 1.9, seqs=8, drafted=False)  # every plain batched step 1.58x its ladder rows
    assert cost(8) == pytest.approx(1.2) and cost(10) == pytest.approx(1.4)
    assert cost.for_batch(8, 8) is cost  # no drafting step seen yet: the ladder's shape
    for _ in range(200):
        cost.observe(10, 1.4 * 1.58 * 1.25, seqs=8, drafted=True)  # drafting steps 25 % dearer still
    assert cost.draft_penalty(8) == pytest.approx(1.25, rel=0.01)
    priced = cost.for_batch(8, 8)
    assert priced(8) == pytest.approx(1.2)  # the plain step is the ladder's
    assert priced(10) == pytest.approx(1.4 * 1.25, rel=0.01)
    assert cost.draft_penalty(4) == 1.0  # other batch sizes learn their own
    # and the allocation sees it: two nodes promising 1.7 tokens pay at the ladder's prices
    # (9.7 tokens / 1.4 beats 8 / 1.2), not once drafting steps are known to cost 25 % more
    assert sum(allocate([[0.9, 0.8]] + [[]] * 7, cost)) == 2
    assert sum(allocate([[0.9, 0.8]] + [[]] * 7, priced)) == 0


def test_one_sequence_updates_keep_the_ladder_non_decreasing():
    cost = StepCost([1, 8, 10], [1.0, 1.2, 1.3])
    for _ in range(100):
        cost.observe(8, 2.0)  # the 8-row point rises past the 10-row one...
    assert cost(10) >= cost(8)  # ...and lifts it with it
    for _ in range(100):
        cost.observe(1, 0.6)
    assert cost(1) <= cost(8) <= cost(10)


def test_plan_prices_a_batch_s_draft_rows_with_its_learned_penalty():
    """The wiring: `Speculator.observe` with a batch size reaches the penalty, and the budget's
    quick bound uses it (a batch that could draft on the ladder's prices cannot once drafting
    steps have cost far more than plain ones)."""
    from types import SimpleNamespace

    from trieserve.decoding.draft import DraftConfig
    from trieserve.decoding.trie import OutputStore
    from trieserve.server.speculation import Speculator

    config = DraftConfig()
    cost = StepCost([1, 2, 4, 8, 16, 32, 64], [1.0, 1.0, 1.05, 1.1, 1.3, 1.8, 3.0])
    spec = Speculator(OutputStore(capacity=1000, ngram_len=config.ngram_len), config, 16, cost)
    batch = []
    for _ in range(2):
        seq = SimpleNamespace(prompt_ids=[5, 6, 7] * 4, output_ids=[], state={}, lookahead=True,
                              request=SimpleNamespace(max_tokens=64), max_context=2048, logical_len=12, evict_at=None)  # fmt: skip
        spec.admit(seq)
        batch.append(seq)
    assert spec._could_pay(batch)  # fresh rates, cheap rows
    for _ in range(300):
        spec.observe(2, 1.0, seqs=2, drafted=False)
        spec.observe(10, 1.3 * 40, seqs=2, drafted=True)  # drafting steps 40x their ladder price
    assert cost.draft_penalty(2) > 30
    assert not spec._could_pay(batch)


def test_a_batch_whose_trees_were_all_dropped_holds_back_its_searches():
    """Eight sequences that could pay by the quick bound (well-rated cells) but whose real trees
    the allocation drops: the next steps of that batch size skip the eight searches, for a wait
    that doubles while the plans stay futile; a plan that keeps a draft resets it."""
    from types import SimpleNamespace

    from trieserve.decoding.draft import DraftConfig
    from trieserve.decoding.trie import OutputStore
    from trieserve.server.speculation import FUTILE_MAX_WAIT, FUTILE_WAIT, Speculator

    config = DraftConfig()
    cost = StepCost([1, 2, 4, 8, 16, 32, 64], [1.0, 1.05, 1.2, 1.5, 2.1, 2.5, 4.0])
    spec = Speculator(OutputStore(capacity=1000, ngram_len=config.ngram_len), config, 16, cost)
    prompt = list(range(100, 140))  # no repeats: nothing to copy, every search finds nothing

    def sequence():
        seq = SimpleNamespace(prompt_ids=prompt, output_ids=[7, 8, 9], state={}, lookahead=True,
                              request=SimpleNamespace(max_tokens=64), max_context=2048, logical_len=43, evict_at=None)  # fmt: skip
        spec.admit(seq)
        cal = seq.state["lookahead"].calibration
        for depth in range(1, config.branch_length + 1):  # every cell lands: the quick bound passes
            for p in (0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0):
                for matched in (0, 1, 2, 4):
                    cal.rates[cal.cell(p, depth, matched)] = 1.0
        cal.version += 1
        return seq

    searched, planned = [], []
    spec.draft_for = lambda seq, orig=spec.draft_for: searched.append(seq) or orig(seq)
    spec._planned = lambda n, kept, orig=spec._planned: planned.append(n) or orig(n, kept)
    batch = [sequence() for _ in range(8)]
    full = []  # per step: a full plan (every sequence searched for a tree to verify)?
    for _ in range(12):
        searched.clear()
        planned.clear()
        assert [len(t) for t in spec.plan(None, batch)] == [0] * 8
        full.append(planned == [8])
        assert len(searched) in (0, 8)  # held back: only the calibrating searches, every OBSERVE_EVERY steps
    # futile at 0, then held back FUTILE_WAIT steps, futile again, held back twice as long, ...
    assert [i for i, f in enumerate(full) if f] == [0, 1 + FUTILE_WAIT, 2 + 3 * FUTILE_WAIT]
    assert spec.futile[8] == (9 + 4 * FUTILE_WAIT, 4 * FUTILE_WAIT)  # set by plan 9 (step 8), its third wait
    # another batch size keeps its own record
    planned.clear()
    spec.plan(None, batch[:4])
    assert planned == [4]
    # a plan that keeps a draft resets the wait
    spec._planned(8, True)
    assert 8 not in spec.futile
    # a futile plan long after the last hold ended starts again at the short wait
    spec._planned(8, False)
    spec.plans += FUTILE_WAIT + FUTILE_MAX_WAIT + 1
    spec._planned(8, False)
    assert spec.futile[8][1] == FUTILE_WAIT
    # a step carrying a prefill chunk drops drafts by its own rule: no hold is learned from it
    spec.futile.clear()
    spec.plan(None, batch, extra_rows=300)
    assert 8 not in spec.futile


def test_drafts_beside_a_big_prefill_chunk_pay_for_their_own_seconds():
    """Eight sequences and a 300-row prompt chunk in one step, on a CPU curve that grows a row's
    cost linearly past the ladder: measured against the chunk-laden step's 8 tokens, 45 modest
    nodes would look like a win; priced at the plain decode rate they are not. On a flat (GPU)
    curve the same nodes ride for free and are kept."""
    cpu = StepCost([1, 2, 4, 8, 16, 32, 64], [30.0, 32.0, 35.0, 48.0, 77.0, 147.0, 269.0])
    modest = [[0.5, 0.3, 0.2, 0.1, 0.1, 0.05]] * 8  # 1.25 tokens per sequence from 6 nodes
    plain = 8 / cpu(8)
    chunk_laden = (8 + 10.0) / cpu(8 + 300 + 48)  # all 48 nodes: better than the laden plain step
    assert chunk_laden > 8 / cpu(8 + 300)
    assert sum(allocate(modest, cpu, extra_rows=300)) == 0
    assert 10.0 / (cpu(8 + 300 + 48) - cpu(8 + 300)) < plain  # what the rule checks, by hand
    flat = StepCost([1, 64, 512], [1.0, 1.0, 1.05])
    assert sum(allocate(modest, flat, extra_rows=300)) == 48


def test_the_batch_draft_penalty_scales_the_draft_rows_not_a_prefill_chunk():
    cost = StepCost([1, 8, 16, 64, 512], [30.0, 48.0, 77.0, 269.0, 2150.0])
    cost.batched[8] = [1.0, 1.2]  # drafting forwards of 8 sequences ran 1.2x their ladder cost
    assert cost.draft_penalty(8) == pytest.approx(1.2)
    plain = cost.for_batch(8, 8)
    assert plain(8) == cost(8) and plain(12) == pytest.approx(1.2 * cost(12))  # the whole step, as learned
    laden = cost.for_batch(8, 308)
    assert laden(308) == cost(308)
    assert laden(320) - laden(308) == pytest.approx(1.2 * (cost(320) - cost(308)))  # not 0.2 x the chunk
