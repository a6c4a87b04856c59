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


def test_batch_allocation_prefers_the_best_nodes_across_sequences():
    cost = StepCost([1, 2, 5, 8], [1.0, 1.0, 1.06, 2.0])
    keep = allocate([[0.9, 0.05], [0.8, 0.7], []], cost)
    assert keep == [1, 1, 0]  # 3 base rows + 2 drafts fit the cheap region; the best two nodes win
    assert sum(keep) <= 5
