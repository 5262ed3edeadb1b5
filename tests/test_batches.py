"""Batch planning: every site's batches in one call equal what the site plans alone, each pass is a
permutation, and the schedule's steps and epochs are honoured."""

import numpy as np
import pytest
import torch

from fedmi.core.batches import LocalSchedule, plan_batches, site_batches
from fedmi.errors import FedmiError

SIZES = [10, 23, 33, 40, 57]


@pytest.mark.parametrize("schedule", [LocalSchedule(16, 7), LocalSchedule(16, None, 2), LocalSchedule(None, 3),
                                      LocalSchedule(100, 2)])
def test_a_site_draws_the_same_batches_alone_and_among_others(schedule):
    plan = plan_batches(schedule, SIZES, [4, 0, 2, 9, 1], seed=3, round_index=5)
    for j, n in enumerate(SIZES):
        alone = site_batches(schedule, n, [4, 0, 2, 9, 1][j], seed=3, round_index=5)
        together = plan.site_batches(j)
        assert len(alone) == len(together) and all(torch.equal(a, b) for a, b in zip(alone, together))


def test_passes_are_permutations_and_steps_count_across_passes():
    batches = site_batches(LocalSchedule(16, 7), 23, 0, 0, 0)
    assert [len(b) for b in batches] == [16, 7, 16, 7, 16, 7, 16]  # 7 steps run over 4 passes
    for p in range(3):
        assert sorted(torch.cat(batches[2 * p: 2 * p + 2]).tolist()) == list(range(23))
    assert not torch.equal(torch.cat(batches[0:2]), torch.cat(batches[2:4]))  # each pass reshuffles


def test_epochs_full_batches_and_keys():
    assert [len(b) for b in site_batches(LocalSchedule(32, None, 1), 100, 0, 0, 0)] == [32, 32, 32, 4]
    full = site_batches(LocalSchedule(None, 2), 9, 0, 0, 0)
    assert all(torch.equal(b, torch.arange(9)) for b in full)  # a full batch keeps the order
    a, b = site_batches(LocalSchedule(8, 1), 50, 0, 0, 0), site_batches(LocalSchedule(8, 1), 50, 1, 0, 0)
    c, d = site_batches(LocalSchedule(8, 1), 50, 0, 0, 1), site_batches(LocalSchedule(8, 1), 50, 0, 1, 0)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


def test_the_order_is_uniform_enough():
    # the first element of a shuffled pass of 10 lands on each index about equally often
    firsts = np.array([int(site_batches(LocalSchedule(5, 1), 10, k, 0, 0)[0][0]) for k in range(4000)])
    counts = np.bincount(firsts, minlength=10)
    assert counts.min() > 320 and counts.max() < 480  # 400 expected; ~6 sigma band


def test_bad_schedules_are_clear_errors():
    with pytest.raises(FedmiError, match="exactly one of"):
        LocalSchedule(32, 10, 1)
    with pytest.raises(FedmiError, match="batch_size must be a positive integer"):
        LocalSchedule(0, 10)
    with pytest.raises(FedmiError, match="no training samples"):
        plan_batches(LocalSchedule(4, 1), [0], [0], 0, 0)
