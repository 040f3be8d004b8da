"""ImageDataset items, determinism, windows, crops, augmentation, labels, collate, DataLoader."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medinfer.data import (
    CacheManager,
    ImageDataset,
    StudyAwareBatchSampler,
    collate_images,
    detokenize,
)
from medinfer.errors import ConfigError


@pytest.fixture
def cached(data_dir):
    CacheManager(data_dir).build_cache(num_workers=0)
    return data_dir


def test_items_are_the_cached_images_as_tokens(cached):
    ds = ImageDataset(cached, ct_window_probs={"blood": 1.0})
    cm = CacheManager(cached)
    assert len(ds) == 6  # the unusable 3-slice image is left out
    assert "ct99" not in ds.study_ids
    for i in range(len(ds)):
        item = ds[i]
        entry = ds.entries[i]
        assert set(item) == {
            "img",
            "coords",
            "filtered",
            "padding",
            "num_tokens",
            "size",
            "path",
            "study",
            "mode",
            "window",
            "view",
        }  # no "label" key without study_labels (torch's default collate refuses None)
        assert item["img"].dtype == torch.float32 and item["img"].shape[1] == 1024
        assert item["coords"].dtype == torch.int64 and item["filtered"].dtype == torch.bool
        assert item["window"] == ("blood" if entry.mode == "ct" else "mri")
        assert item["path"] == entry.path and not item["padding"].any()
        vol = detokenize(item["img"].numpy(), item["coords"].numpy(), item["size"].numpy())
        window = item["window"]
        assert np.array_equal(vol, cm.load_image(entry.study, entry.image, window)[0])
        mask = cm.load_mask(entry.study, entry.image).reshape(-1).astype(bool)
        assert np.array_equal(item["filtered"].numpy(), mask)


def test_window_draws_follow_probs_and_are_seeded(cached):
    ds = ImageDataset(cached, ct_window_probs=[0.0, 0.5, 0.5], seed=3)
    ct = [i for i, e in enumerate(ds.entries) if e.mode == "ct"]
    draws = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        draws.append(tuple(ds[i]["window"] for i in ct))
    flat = [w for d in draws for w in d]
    assert "brain" not in flat and {"blood", "bone"} == set(flat)
    ds.set_epoch(4)
    assert tuple(ds[i]["window"] for i in ct) == draws[4]
    ds2 = ImageDataset(cached, ct_window_probs=[0.0, 0.5, 0.5], seed=3)
    ds2.set_epoch(4)
    assert tuple(ds2[i]["window"] for i in ct) == draws[4]
    with pytest.raises(ConfigError, match="unknown window"):
        ImageDataset(cached, ct_window_probs={"lung": 1.0})


def test_random_crop_is_token_aligned_and_augment_deterministic(cached):
    full = ImageDataset(cached, ct_window_probs={"brain": 1.0}, tokenize=False)
    crop = ImageDataset(cached, ct_window_probs={"brain": 1.0}, random_crop=(2, 2, 2), seed=1)
    i = 0
    vol = full[i]["img"][0].numpy()
    seen = set()
    for epoch in range(6):
        crop.set_epoch(epoch)
        item = crop[i]
        size = item["size"].numpy()
        assert np.all(size <= [2, 2, 2])
        part = detokenize(item["img"].numpy(), item["coords"].numpy(), size)
        # find the crop inside the full volume: token-aligned offsets
        hits = [
            (a, b, c)
            for a in range(0, vol.shape[0] - part.shape[0] + 1, 4)
            for b in range(0, vol.shape[1] - part.shape[1] + 1, 16)
            for c in range(0, vol.shape[2] - part.shape[2] + 1, 16)
            if np.array_equal(
                vol[a : a + part.shape[0], b : b + part.shape[1], c : c + part.shape[2]], part
            )
        ]
        assert hits
        seen.add(hits[0])
    assert len(seen) > 1
    aug = ImageDataset(cached, augment=True, seed=2)
    a0 = aug[0]["img"]
    assert torch.equal(a0, aug[0]["img"])
    assert float(a0.min()) >= 0 and float(a0.max()) <= 1
    variants = set()
    for epoch in range(6):
        aug.set_epoch(epoch)
        variants.add(aug[0]["img"].sum().item())
    assert len(variants) > 1


def test_labels_and_missing_labels(cached, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("study,ich\nct00,1\nct01,0\nct02,1\ndcm00,0\nmr00,1\n")
    ds = ImageDataset(cached, study_labels=csv)
    labels = {ds[i]["study"]: float(ds[i]["label"]) for i in range(len(ds))}
    assert labels == {"ct00": 1.0, "ct01": 0.0, "ct02": 1.0, "dcm00": 0.0, "mr00": 1.0}
    csv.write_text("study,ich\nct00,1\n")
    with pytest.raises(ConfigError, match="no label for 4 studies"):
        ImageDataset(cached, study_labels=csv)
    ds = ImageDataset(cached, study_labels=csv, missing_label="skip")
    assert ds.study_ids == ["ct00"]


def test_on_the_fly_matches_cache_and_unusable_items_are_dropped(data_dir):
    with pytest.raises(ConfigError, match="not cached"):
        ImageDataset(data_dir, use_cache=True)
    ds = ImageDataset(data_dir, use_cache=False, ct_window_probs={"bone": 1.0})
    assert len(ds) == 7
    thin = ds.study_ids.index("ct99")
    assert ds[thin] is None
    CacheManager(data_dir).build_cache(num_workers=0)
    cached = ImageDataset(data_dir, ct_window_probs={"bone": 1.0})
    fly = ds[0]["img"]
    assert fly.shape == cached[0]["img"].shape
    assert float((fly - cached[0]["img"]).abs().max()) <= 1 / 510 + 1e-6
    batch = collate_images([ds[0], ds[thin], ds[1]])
    assert batch["img"].shape[0] == 2


def test_collate_and_dataloader_with_study_sampler(cached):
    ds = ImageDataset(cached)
    sampler = StudyAwareBatchSampler(ds, batch_size=3, seed=0, num_replicas=1, rank=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_images, num_workers=0)
    seen = []
    for batch in loader:
        b, n = batch["padding"].shape
        assert batch["img"].shape == (b, n, 1024) and batch["coords"].shape == (b, n, 3)
        for i in range(b):
            k = int(batch["num_tokens"][i])
            assert not batch["padding"][i, :k].any() and batch["padding"][i, k:].all()
            assert batch["filtered"][i, k:].all() and (batch["img"][i, k:] == 0).all()
            assert k == int(torch.prod(batch["size"][i]))
        seen += batch["study"]
    assert sorted(seen) == sorted(ds.study_ids)
    vols = ImageDataset(cached, tokenize=False)
    batch = collate_images([vols[0], vols[5]])
    assert batch["img"].ndim == 5 and "coords" not in batch
    d, h, w = (max(vols[i]["img"].shape[k + 1] for i in (0, 5)) for k in range(3))
    assert batch["img"].shape == (2, 1, d, h, w)
    assert batch["filtered"].shape == (2, d // 4, h // 16, w // 16)
    with pytest.raises(ConfigError, match="mixes"):
        collate_images([vols[0], ds[0]])


def test_items_do_not_depend_on_the_loader_worker(cached):
    ds = ImageDataset(cached, random_crop=(2, 3, 3), augment=True, seed=11)

    def run(workers):
        sampler = StudyAwareBatchSampler(ds, batch_size=3, seed=4, num_replicas=1, rank=0)
        sampler.set_epoch(2)
        loader = DataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=collate_images,
            num_workers=workers,
            multiprocessing_context="fork" if workers else None,
        )
        return [(b["study"], b["window"], b["img"]) for b in loader]

    serial, parallel = run(0), run(2)
    assert len(serial) == len(parallel)
    for (s1, w1, i1), (s2, w2, i2) in zip(serial, parallel, strict=True):
        assert s1 == s2 and w1 == w2 and torch.equal(i1, i2)
