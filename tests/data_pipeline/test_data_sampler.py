"""StudyAwareBatchSampler over 1, 2 and 4 simulated DDP ranks: one study per batch."""

import logging

import numpy as np
import pytest

from medinfer.data import StudyAwareBatchSampler
from medinfer.errors import ConfigError


class FakeDataset:
    def __init__(self, sizes):
        self.study_ids = [f"s{s:02d}" for s, n in enumerate(sizes) for _ in range(n)]
        self.epoch = None

    def set_epoch(self, epoch):
        self.epoch = epoch


SIZES = [int(v) for v in np.random.default_rng(5).integers(1, 6, size=23)] + [9]


def _epoch(ds, ranks, epoch, batch_size=6, seed=7):
    per_rank = []
    for r in range(ranks):
        s = StudyAwareBatchSampler(
            ds, batch_size, shuffle=True, seed=seed, num_replicas=ranks, rank=r
        )
        s.set_epoch(epoch)
        per_rank.append(list(s))
        assert len(s) == len(per_rank[-1])
    return per_rank


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_one_study_per_batch_every_image_once_per_epoch(ranks):
    ds = FakeDataset(SIZES)
    orders = []
    for epoch in (0, 1):
        per_rank = _epoch(ds, ranks, epoch)
        assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
        all_idx = [i for batches in per_rank for b in batches for i in b]
        assert sorted(all_idx) == list(range(len(ds.study_ids)))  # every image exactly once
        study_rank = {}
        for r, batches in enumerate(per_rank):
            for b in batches:
                studies = {ds.study_ids[i] for i in b}
                assert len(studies) == 1  # one study per batch
                assert len(b) <= 6  # batch_size caps a large study
                assert study_rank.setdefault(studies.pop(), r) == r  # a study lives on one rank
        assert len(study_rank) == len(SIZES)
        orders.append(per_rank)
    assert orders[0] != orders[1]  # set_epoch reshuffles
    assert ds.epoch == 1  # and is passed on to the dataset
    assert _epoch(ds, ranks, 1) == orders[1]  # same seed and epoch -> same batches


def test_no_shuffle_is_sorted_and_a_large_study_is_split_in_consecutive_batches():
    ds = FakeDataset([2, 9, 1])
    batches = list(StudyAwareBatchSampler(ds, 4, shuffle=False, num_replicas=1, rank=0))
    assert batches == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9], [10], [11]]


def test_too_few_images_for_the_ranks(caplog):
    ds = FakeDataset([1, 1, 1])
    caplog.set_level(logging.WARNING)
    per_rank = [list(StudyAwareBatchSampler(ds, 8, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(b) == 1 for b in per_rank) and "repeating batches" in caplog.text
    # unequal batch counts are evened out by splitting a study's batch, not by repeating
    caplog.clear()
    ds = FakeDataset([3, 1, 1])
    per_rank = [
        list(StudyAwareBatchSampler(ds, 8, shuffle=False, num_replicas=2, rank=r))
        for r in range(2)
    ]
    assert per_rank == [[[0], [1, 2]], [[3], [4]]] and "repeating" not in caplog.text
    one = FakeDataset([1])
    dropped = [
        list(StudyAwareBatchSampler(one, 8, num_replicas=2, rank=r, drop_last=True))
        for r in range(2)
    ]
    assert dropped == [[], []]


def test_bad_arguments():
    ds = FakeDataset([1, 1])
    with pytest.raises(ConfigError, match="batch_size"):
        StudyAwareBatchSampler(ds, 0)
    with pytest.raises(ConfigError, match=r"rank: 2 is not in \[0, 2\)"):
        StudyAwareBatchSampler(ds, 2, num_replicas=2, rank=2)
