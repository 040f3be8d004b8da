"""Acceptance 3: StudyAwareBatchSampler over 1, 2 and 4 simulated DDP ranks."""

import logging
from collections import Counter

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
def test_every_study_once_per_epoch_never_split(ranks):
    ds = FakeDataset(SIZES)
    orders = []
    for epoch in (0, 1):
        per_rank = _epoch(ds, ranks, epoch)
        assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
        all_idx = [i for batches in per_rank for b in batches for i in b]
        assert sorted(all_idx) == list(range(len(ds.study_ids)))  # every image exactly once
        study_rank, study_batch = {}, Counter()
        for r, batches in enumerate(per_rank):
            for b in batches:
                studies = {ds.study_ids[i] for i in b}
                for st in studies:
                    assert study_rank.setdefault(st, r) == r  # a study lives on one rank
                    study_batch[st] += 1
                # batch size respected unless one study alone is larger
                assert len(b) <= 6 or len(studies) == 1
        assert set(study_batch.values()) == {1}  # never split across batches
        assert len(study_batch) == len(SIZES)
        orders.append(per_rank)
    assert orders[0] != orders[1]  # set_epoch reshuffles
    assert ds.epoch == 1  # and is passed on to the dataset
    assert _epoch(ds, ranks, 1) == orders[1]  # same seed and epoch -> same batches


def test_no_shuffle_is_sorted_and_study_larger_than_batch_is_whole():
    ds = FakeDataset([2, 9, 1])
    batches = list(StudyAwareBatchSampler(ds, 4, shuffle=False, num_replicas=1, rank=0))
    assert batches == [[0, 1], list(range(2, 11)), [11]]


def test_too_few_studies_for_the_ranks(caplog):
    ds = FakeDataset([2, 3, 1])
    caplog.set_level(logging.WARNING)
    per_rank = [list(StudyAwareBatchSampler(ds, 8, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(b) == 1 for b in per_rank) and "repeating 1 batch" in caplog.text
    one = FakeDataset([3])
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
