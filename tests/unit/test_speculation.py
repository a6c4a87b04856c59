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


def test_batch_allocation_sizes_one_tree_depth_for_the_padded_batch():
    cost = StepCost([1, 2, 5, 8], [1.0, 1.0, 1.06, 2.0])
    # k=1 pads to 3 x 2 = 6 rows (cost 1.37) and gains 0.9 + 0.8; k=2 would pay 9 rows for 0.75 more
    keep = allocate([[0.9, 0.05], [0.8, 0.7], []], cost)
    assert keep == [1, 1, 0]


def test_one_drafting_sequence_does_not_pad_a_big_batch_on_a_cpu():
    """On a CPU a forward's cost grows with its rows: one good tree in a batch of eight costs
    eight rows per tree row, so the batch decodes plainly; alone, the same tree pays."""
    cpu = StepCost([1, 2, 4, 8, 16, 32, 64, 128], [1.0, 1.2, 1.4, 1.8, 2.4, 3.6, 6.0, 11.0])
    good = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5]
    assert allocate([good], cpu)[0] >= 4
    assert allocate([good] + [[]] * 7, cpu) == [0] * 8
    # when every sequence has a good tree, the padded rows are all useful and drafting pays again
    assert min(allocate([good] * 8, cpu)) >= 1


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
        return seq.state["lookahead"].calibration

    assert admitted() == 1.0
    spec.prior = 0.8
    assert admitted() == 0.8
    spec.prior = 0.01  # drafts have kept failing everywhere: start low, but able to learn
    assert admitted() == PRIOR_FLOOR
