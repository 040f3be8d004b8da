"""Issue 11: the NeuroVFM data-pipeline description's snippets run as written.

A ``/data`` tree as the description lays it out (``raw/<study>/T1.nii.gz``, a DICOM CT
folder ``raw/patient_002/ct_scan/``, a study with two MRI sequences) is built in a
temporary folder; each snippet runs with ``neurovfm`` replaced by ``medinfer`` and
``/data`` by that folder. Step 2 (``build_cache``) runs as a plain script without
``if __name__ == "__main__"``. Shapes are asserted as the description states them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dp_helpers import head_phantom, reframe, rotation, save_nifti, write_ct_series_lps

from medinfer.data import CacheManager, DatasetMetadata, PrepareConfig, prepare_for_inference
from medinfer.data.cache import CacheBuildError


def _mri(shape, spacing, scale=0.2):
    arr, aff, _ = head_phantom(shape, spacing)
    return (np.clip(arr.astype(np.float32) + 1000, 0, 1100) * scale + 7.0), aff


def _make_tree(root: Path) -> Path:
    raw = root / "raw"
    t1, aff = _mri((40, 44, 36), (1.0, 1.0, 1.2))
    save_nifti(t1, aff, raw / "patient_001" / "T1.nii.gz")
    ct, aff, _ = head_phantom((40, 40, 12), (1.1, 1.1, 3.5))
    write_ct_series_lps(ct, aff, raw / "patient_002" / "ct_scan", seed=2)
    t1b, aff = _mri((36, 40, 36), (1.0, 1.0, 1.0), scale=0.3)
    save_nifti(t1b, aff, raw / "patient_003" / "T1.nii.gz")
    flair, aff = _mri((44, 48, 12), (1.0, 1.0, 4.0), scale=0.25)
    save_nifti(flair, aff, raw / "patient_003" / "FLAIR.nii.gz")
    ct4, aff, _ = head_phantom((44, 44, 14), (1.0, 1.0, 3.0))
    save_nifti(ct4, aff, raw / "patient_004" / "head_ct.nii.gz")
    return root


def _run_snippet(code: str, data: Path, **names: object) -> dict[str, object]:
    """Run a description snippet with the package and folder replaced."""
    text = textwrap.dedent(code).replace("neurovfm", "medinfer").replace("'/data", f"'{data}")
    scope: dict[str, object] = dict(names)
    exec(compile(text, "<snippet>", "exec"), scope)
    return scope


STEP1 = """
from neurovfm.data import DatasetMetadata

# Specify CT vs MRI for each study
mode_mapping = {
    'patient_001': 'mri',
    'patient_002': 'ct',
    'patient_003': 'mri',
    'patient_004': 'ct',
}

# Create metadata
metadata = DatasetMetadata.from_directory('/data', mode_mapping)
metadata.save('/data/metadata.json')
"""

STEP2 = """
from neurovfm.data import CacheManager

cache = CacheManager('/data')
cache.build_cache(num_workers=2)
"""


def _plain_script(path: Path, body: str, data: Path) -> subprocess.CompletedProcess[str]:
    text = textwrap.dedent(body).replace("neurovfm", "medinfer").replace("/data", str(data))
    path.write_text(text)
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _make_tree(tmp_path_factory.mktemp("neurovfm") / "data")
    _run_snippet(STEP1, root)
    r = _plain_script(root.parent / "build.py", STEP2, root)  # acceptance 3: plain script
    assert r.returncode == 0, r.stderr
    return root


def test_step2_plain_script_builds_the_documented_layout(data: Path) -> None:
    p = data / "processed"
    for rel in ("patient_001/T1.pt", "patient_001/T1_mask.pt", "patient_003/FLAIR.pt"):
        assert (p / rel).is_file(), rel
    for w in ("brain", "blood", "bone", "mask"):
        t = torch.load(p / "patient_002" / f"ct_scan_{w}.pt", weights_only=True)
        assert t.dtype == torch.uint8
        assert t.ndim == (1 if w == "mask" else 4)
    img = torch.load(p / "patient_001" / "T1.pt", weights_only=True)
    mask = torch.load(p / "patient_001" / "T1_mask.pt", weights_only=True)
    _, d, h, w = img.shape
    assert img.shape[0] == 1 and d % 4 == 0 and h % 16 == 0 and w % 16 == 0
    assert mask.shape == ((d // 4) * (h // 16) * (w // 16),)
    stats = CacheManager(data).get_cache_stats()
    assert stats["cached"] == 5 and stats["missing"] == 0


def test_quick_start(data: Path) -> None:
    shapes = []

    def model(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return x.mean()

    scope = _run_snippet(
        """
        from neurovfm.data import load_image, prepare_for_inference

        # Load any image
        img = load_image('/data/raw/patient_001/T1.nii.gz')  # or .dcm or dicom_dir/

        # Prepare for model
        img_arrs, mask, view = prepare_for_inference(img, mode='mri')  # or mode='ct'

        # Use with model
        output = model(img_arrs[0])
        ct_arrs, ct_mask, ct_view = prepare_for_inference(
            load_image('/data/raw/patient_002/ct_scan'), mode='ct')
        """,
        data,
        model=model,
    )
    img_arrs, mask = scope["img_arrs"], scope["mask"]
    assert isinstance(img_arrs, list) and len(img_arrs) == 1 and scope["view"] == "axial"
    _, d, h, w = shapes[0]
    assert shapes[0][0] == 1 and img_arrs[0].dtype == torch.float32
    assert mask.dtype == torch.uint8 and mask.shape == ((d // 4) * (h // 16) * (w // 16),)
    ct = scope["ct_arrs"]
    assert len(ct) == 3 and ct.names == ("brain", "blood", "bone")
    assert all(a.shape[0] == 1 and a.ndim == 4 for a in ct)
    for a in [*img_arrs, *ct]:
        assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def _model_3(img: torch.Tensor, coords: torch.Tensor, filtered: torch.Tensor | None = None):
    b, n, dim = img.shape
    assert dim == 1024 and coords.shape == (b, n, 3)
    assert filtered is None or filtered.shape == (b, n)
    return img.mean()


def test_step3_and_3a_image_level_loops(data: Path) -> None:
    seen: list[str] = []
    scope = _run_snippet(
        """
        from neurovfm.datasets import ImageDataset
        from torch.utils.data import DataLoader

        dataset = ImageDataset('/data', use_cache=True)
        loader = DataLoader(dataset, batch_size=4, shuffle=True)

        for batch in loader:
            img = batch['img']  # [B, N, 1024] tokenized patches
            assert img.ndim == 3 and img.shape[0] <= 4 and img.shape[2] == 1024
            assert batch['coords'].shape == (*img.shape[:2], 3)
            assert batch['filtered'].shape == img.shape[:2]

        dataset = ImageDataset(
            '/data',
            use_cache=True,
            random_crop=True,
            augment=True
        )
        loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=4)

        for epoch in range(num_epochs):
            for batch in loader:
                img = batch['img']  # [4, N, 1024]
                outputs = model(img, batch['coords'], batch['filtered'])
                seen.extend(batch['path'])
        """,
        data,
        model=_model_3,
        num_epochs=2,
        seen=seen,
    )
    assert len(scope["dataset"]) == 5
    assert sorted(seen) == sorted(2 * [e.path for e in scope["dataset"].entries])


def test_3b_study_level_loop_one_study_per_batch(data: Path) -> None:
    batches: list[tuple[int, list[str], list[str]]] = []
    scope = _run_snippet(
        """
        from neurovfm.datasets import ImageDataset, StudyAwareBatchSampler

        dataset = ImageDataset('/data', use_cache=True)
        sampler = StudyAwareBatchSampler(dataset, batch_size=8, shuffle=True)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)

        for epoch in range(num_epochs):
            sampler.set_epoch(epoch)  # For DDP shuffling
            for batch in loader:
                # All images from same study
                outputs = model(batch['img'], batch['coords'])
                batches.append((epoch, batch['study'], batch['path']))
        """,
        data,
        model=_model_3,
        num_epochs=2,
        batches=batches,
        DataLoader=torch.utils.data.DataLoader,
    )
    paths = sorted(e.path for e in scope["dataset"].entries)
    for epoch in (0, 1):
        ep = [b for b in batches if b[0] == epoch]
        assert all(len(set(studies)) == 1 for _, studies, _ in ep)
        assert sorted(p for _, _, ps in ep for p in ps) == paths  # every image once
        assert len(ep) == 4  # one batch per study (patient_003 holds two images)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_3b_ranks_every_image_once_one_study_per_batch(data: Path, ranks: int) -> None:
    from medinfer.datasets import ImageDataset, StudyAwareBatchSampler

    ds = ImageDataset(data, use_cache=True)
    for epoch in (0, 1):
        got: list[str] = []
        counts = set()
        for rank in range(ranks):
            sampler = StudyAwareBatchSampler(ds, 8, num_replicas=ranks, rank=rank, seed=42)
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
            n = 0
            for batch in loader:
                assert len(set(batch["study"])) == 1
                assert batch["img"].shape[0] == len(batch["path"])
                got.extend(batch["path"])
                n += 1
            counts.add(n)
        assert len(counts) == 1  # every rank steps the same number of times
        assert sorted(got) == sorted(e.path for e in ds.entries)


def test_labels_example_with_study_id_csv(data: Path) -> None:
    (data / "labels.csv").write_text(
        "study_id,label_a,label_b,label_c\n"
        "patient_001,1,0,1\npatient_002,0,1,0\npatient_003,1,1,0\npatient_004,0,0,1\n"
    )
    scope = _run_snippet(
        """
        from neurovfm.datasets import ImageDataset

        # Binary classification (single label)
        dataset = ImageDataset(
            '/data',
            study_labels='/data/labels.csv',  # CSV with study_id,label columns
            use_cache=True
        )

        # All images from same study get same label
        batch = dataset[0]
        label, study = batch['label'], batch['study']
        loader = DataLoader(dataset, batch_size=4, shuffle=True)
        stacked = next(iter(loader))['label']
        """,
        data,
        DataLoader=torch.utils.data.DataLoader,
    )
    assert scope["study"] == "patient_001"
    assert scope["label"].tolist() == [1.0, 0.0, 1.0]
    assert scope["stacked"].shape == (4, 3)


def test_build_cache_raises_naming_a_corrupt_image_or_skips_it(data: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "raw" / "patient_008").mkdir()
    (root / "raw" / "patient_008" / "T1.nii.gz").write_bytes(b"\x1f\x8b\x08\x00broken" * 40)
    t1, aff = _mri((36, 40, 36), (1.0, 1.0, 1.0))
    save_nifti(t1, aff, root / "raw" / "patient_009" / "T1.nii.gz")
    modes = {"patient_002": "ct", "patient_004": "ct", "*": "mri"}
    DatasetMetadata.from_directory(root, modes).save(root)
    r = _plain_script(root.parent / "build.py", STEP2, root)
    assert r.returncode != 0
    assert "CacheBuildError" in r.stderr and "patient_008/T1.nii.gz" in r.stderr
    assert (root / "processed" / "patient_009" / "T1.pt").is_file()  # the rest is built
    report = CacheManager(root).build_cache(num_workers=2, on_error="skip")
    assert list(report.failed) == ["patient_008/T1.nii.gz"]
    with pytest.raises(CacheBuildError, match="patient_008/T1.nii.gz"):
        CacheManager(root).build_cache(num_workers=0)


def test_earlier_cache_layout_is_still_read(data: Path, tmp_path: Path) -> None:
    """A version-1 entry (processed/<study>/<image>/*.npy + meta.json) is read as before."""
    import json

    root = tmp_path / "data"
    shutil.copytree(data, root)
    cm = CacheManager(root)
    new = cm.entry_meta("patient_001", "T1.nii.gz")
    arr = cm.load_image("patient_001", "T1.nii.gz")
    bg = cm.load_mask("patient_001", "T1.nii.gz")
    old = root / "processed" / "patient_001" / "T1.nii.gz"
    old.mkdir()
    np.save(old / "mri.npy", np.rint(arr[0] * 255).astype(np.uint8))
    np.save(old / "mask.npy", bg)
    meta = {k: v for k, v in new.items() if k not in ("channel_files", "mask_file", "stem")}
    meta.update(version=1, files={"mri.npy": 0})
    (old / "meta.json").write_text(json.dumps(meta))
    for f in ("T1.pt", "T1_mask.pt", "T1.json"):
        (root / "processed" / "patient_001" / f).unlink()
    cm = CacheManager(root)
    assert cm.entry_meta("patient_001", "T1.nii.gz")["version"] == 1
    assert np.array_equal(cm.load_image("patient_001", "T1.nii.gz"), arr)
    from medinfer.datasets import ImageDataset

    ds = ImageDataset(root, use_cache=True)
    i = [e.study for e in ds.entries].index("patient_001")
    assert ds[i]["img"].shape[1] == 1024


def _oblique_int16_scaled(tmp_path: Path) -> Path:
    arr, aff, _ = head_phantom((48, 40, 14), (0.9, 1.3, 3.3))
    stored = ((arr.astype(np.float32) + 1024.0) / 0.5).astype(np.int16)
    img = nib.Nifti1Image(stored, rotation(14, -9, 22) @ aff)
    img.header.set_slope_inter(0.5, -1024.0)
    path = tmp_path / "oblique_scaled.nii.gz"
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("mode", ["ct", "mri"])
def test_values_in_unit_range_for_every_input_type(tmp_path: Path, mode: str) -> None:
    import SimpleITK as sitk

    path = _oblique_int16_scaled(tmp_path)
    inputs = {
        "path": str(path),
        "nibabel": nib.load(str(path)),
        "sitk": sitk.ReadImage(str(path)),
    }
    results = {}
    for name, image in inputs.items():
        cfg = PrepareConfig(mri_percentiles=(0, 100))
        out = prepare_for_inference(image, mode=mode, config=cfg)
        assert out is not None, name
        arrs, mask, view = out
        for a in arrs:
            assert a.dtype == torch.float32 and a.ndim == 4 and a.shape[0] == 1
            assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0, (name, float(a.max()))
        assert int(mask.numel()) == int(np.prod(arrs.token_grid))
        results[name] = arrs
    # the SimpleITK (LPS) and nibabel (RAS) inputs give the path's arrays (SimpleITK reads
    # the float32 quaternion / sform of the header: affine equal to ~1e-6, values to 1e-4)
    for name in ("nibabel", "sitk"):
        for a, b in zip(results[name], results["path"], strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4, err_msg=name)


def test_load_image_preprocess_flag_and_wrong_input_types(tmp_path: Path) -> None:
    import SimpleITK as sitk

    from medinfer.data import load_image
    from medinfer.errors import InvalidImageError

    arr, aff, _ = head_phantom((30, 34, 12), (0.9, 1.3, 3.3))
    a, f = reframe(arr, aff, (2, 0, 1), (True, True, False))  # stored as SLP
    path = save_nifti(a, rotation(10, -5, 8) @ f, tmp_path / "slp.nii.gz")
    stored = load_image(path, preprocess=False)
    rpi = load_image(path, preprocess=True)
    assert stored.orientation != "RPI" and rpi.orientation == "RPI"
    assert load_image(path).orientation == "RPI"  # preprocess=True is the default
    # the same voxels, only permuted / flipped: same world position of every voxel value
    assert np.array_equal(np.sort(stored.array.ravel()), np.sort(rpi.array.ravel()))
    with pytest.raises(InvalidImageError, match="Image is not a path"):
        load_image(sitk.ReadImage(str(path)))
    with pytest.raises(InvalidImageError, match="not an image; pass a path"):
        prepare_for_inference(object(), mode="ct")
