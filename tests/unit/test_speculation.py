"""The adaptive draft budget: cost interpolation and batch allocation (no model)."""

import pytest
from trieserve.server.speculation import StepCost, allocate


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
    from trieserve.server.speculation import PRIOR_FLOOR, Speculator

    config = DraftConfig()
    spec = Speculator(OutputStore(capacity=1000, ngram_len=config.ngram_len), config, 8, StepCost([1], [1.0]))

    def admitted():
        seq = SimpleNamespace(prompt_ids=[1, 2, 3, 4], state={})
        spec.admit(seq)
        return seq.state["lookahead"].calibration.scale()

    depths = config.branch_length
    assert admitted() == [1.0] * depths
    spec.prior.accepted = [0.8] * depths
    assert admitted() == pytest.approx([0.8] * depths)
    spec.prior.accepted[0] = 0.01  # first tokens have kept failing everywhere: start low, but able to learn
    assert admitted()[0] == PRIOR_FLOOR and admitted()[1] == pytest.approx(0.8)


def test_depth_calibration_learns_where_drafts_fail():
    """Chains promised as certain whose first token lands 1 time in 3 and, once it does, run
    to the end: the first depth is scaled down to ~1/3, and every deeper depth to about the
    same (reaching depth d needs the first token), not to accepted/promised over the whole tree."""
    from trieserve.server.speculation import DepthCalibration

    cal = DepthCalibration(4, alpha=0.05)
    for step in range(600):
        cal.observe([1.0, 1.0, 1.0, 1.0], reached=4 if step % 3 == 0 else 0)
    scale = cal.scale()
    assert scale[0] == pytest.approx(1 / 3, abs=0.08)
    assert scale[3] == pytest.approx(1 / 3, abs=0.08)
    cal.observe([0.5, 0.0, 0.0, 0.0], reached=1)  # depths the tree did not reach are left alone
    assert cal.scale()[3] == scale[3]
    assert cal.scale()[0] > scale[0]


def test_depth_calibration_is_bounded():
    from trieserve.server.speculation import DepthCalibration

    cal = DepthCalibration(2)
    for _ in range(100):
        cal.observe([1e-6, 1e-6], reached=2)  # the counts promised almost nothing, all landed
    assert max(cal.scale()) == 2.0
    for _ in range(100):
        cal.observe([1.0, 1.0], reached=0)
    assert min(cal.scale()) == 0.02


def test_no_trie_search_when_no_draft_could_pay_for_the_batch():
    """Eight sequences whose drafts have kept failing, on a CPU where padding the batch to two
    rows per sequence costs 1.4x: even perfect trees would lose, so the step drafts nothing,
    without searching the tries, but every sequence's new output still reaches the shared store.
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
                              request=SimpleNamespace(max_tokens=64), max_context=2048, logical_len=35)  # fmt: skip
        spec.admit(seq)
        return seq

    searched = []
    spec.draft_for = lambda seq, orig=spec.draft_for: searched.append(seq) or orig(seq)
    batch = [sequence() for _ in range(8)]
    for seq in batch:
        seq.state["lookahead"].calibration.accepted = [0.1] * config.branch_length
    assert [len(t) for t in spec.plan(None, batch)] == [0] * 8
    assert searched == []
    assert spec.store.find([5, 6]) is not None  # the output was streamed into the store
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
    from trieserve.server.speculation import Payoff

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
