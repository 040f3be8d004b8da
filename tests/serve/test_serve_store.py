"""Job store and worker pool, with a tiny fake engine (unit level; the API tests use the
real Predictor)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _serve_support import make_scan

from medinfer.errors import InvalidImageError
from medinfer.prediction import LabelStatistics, Prediction
from medinfer.serve.engine import JobConfig, parse_job_config
from medinfer.serve.jobs import JobManager
from medinfer.serve.store import JobStatus, JobStore, QueueFullError
from medinfer.serve.uploads import Limits
from medinfer.volume import Volume

LIMITS = Limits(max_upload_bytes=10_000_000, max_voxels=10_000_000,
                max_unpacked_bytes=100_000_000, max_archive_members=100)


class FakeEngine:
    """Thresholds the scan at its mean; reports progress in 4 steps; can be gated."""

    name = "fake"
    card_json: dict[str, Any] = {"name": "fake", "labels": {"0": {"name": "bg"},
                                                              "1": {"name": "fg"}}}

    def __init__(self, gate: threading.Event | None = None, fail_on: float | None = None):
        self.gate = gate
        self.fail_on = fail_on
        self.calls = 0

    def predict(self, volume: Volume, config: JobConfig, progress: Any = None) -> Prediction:
        self.calls += 1
        for i in range(4):
            if progress:
                progress("inference", i / 4)
            if self.gate is not None and not self.gate.wait(10):
                raise TimeoutError("gate")
        a = volume.array[0].astype(np.float32)
        if self.fail_on is not None and float(a.max()) > self.fail_on:
            raise InvalidImageError("fake: too bright")
        label = (a > a.mean()).astype(np.uint8)
        n = int(label.sum())
        return Prediction(label=volume.with_array(label[None]),
                          statistics=[LabelStatistics(1, "fg", n, n / 1000.0)],
                          model_name="fake", model_version="0")


def _wait(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise TimeoutError("condition not reached")


def _upload(tmp: Path, seed: int) -> Path:
    src = make_scan(tmp / f"scan{seed}.nii.gz", seed=seed)
    return src


def test_store_add_claim_finish_and_queue_limit(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "store")
    ids = [store.new_id() for _ in range(3)]
    for i in ids[:2]:
        store.add(i, input_name="", config={}, queue_limit=2)
    with pytest.raises(QueueFullError) as err:
        store.add(ids[2], input_name="", config={}, queue_limit=2, retry_after=7)
    assert err.value.retry_after == 7
    assert store.get(ids[2]) is None
    job = store.claim_next()
    assert job is not None and job.id == ids[0] and job.status is JobStatus.RUNNING
    store.set_progress(job.id, 40, "inference")
    store.set_progress(job.id, 30, "inference")  # never lowered
    assert store.get(job.id).progress == 40  # type: ignore[union-attr]
    assert store.finish(job.id, JobStatus.SUCCEEDED, result={"a": 1}, files=["label.nii.gz"])
    assert not store.finish(job.id, JobStatus.FAILED)  # only running jobs finish
    done = store.get(job.id)
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.progress == 100


def test_recover_requeues_running_and_removes_partial_outputs(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "store")
    a, b = store.new_id(), store.new_id()
    for i in (a, b):
        store.input_dir(i).mkdir(parents=True)
        store.add(i, input_name="", config={}, queue_limit=10)
    store.claim_next()
    half = store.outputs / f".{a}.tmp"
    half.mkdir()
    (half / "label.nii.gz").write_bytes(b"partial")
    (store.outputs / a).mkdir()  # renamed but the row never marked succeeded
    orphan = store.inputs / ("f" * 32)
    orphan.mkdir()
    store.close()
    store2 = JobStore(tmp_path / "store")  # "restart"
    assert store2.recover() == [a]
    assert store2.get(a).status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert not half.exists() and not (store2.outputs / a).exists() and not orphan.exists()
    assert store2.input_dir(a).exists() and store2.input_dir(b).exists()
    assert [store2.claim_next().id, store2.claim_next().id] == [a, b]  # type: ignore[union-attr]


def test_expiry_deletes_files_and_marks_expired(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "store")
    i = store.new_id()
    store.add(i, input_name="", config={}, queue_limit=10)
    store.claim_next()
    store.output_dir(i).mkdir()
    store.finish(i, JobStatus.SUCCEEDED, result={}, files=[])
    assert store.expire(3600.0) == []
    assert store.expire(10.0, now=time.time() + 60) == [i]
    assert store.get(i).status is JobStatus.EXPIRED  # type: ignore[union-attr]
    assert not store.output_dir(i).exists()


def test_manager_runs_jobs_with_monotonic_progress_and_cancel(tmp_path: Path) -> None:
    gate = threading.Event()
    engine = FakeEngine(gate)
    store = JobStore(tmp_path / "store")
    outcomes: list[str] = []
    mgr = JobManager(store, lambda: engine, LIMITS, workers=1, queue_limit=10,
                     on_outcome=outcomes.append)
    mgr.start()
    try:
        j1 = mgr.submit(_upload(tmp_path, 1), JobConfig())
        j2 = mgr.submit(_upload(tmp_path, 2), JobConfig())
        _wait(lambda: store.get(j1.id).status is JobStatus.RUNNING)  # type: ignore[union-attr]
        assert mgr.cancel(j2.id) is JobStatus.CANCELLED  # queued: at once
        j3 = mgr.submit(_upload(tmp_path, 3), JobConfig())
        gate.set()
        _wait(lambda: len(outcomes) == 3)  # reported after the clean-up
        for j in (j1, j3):
            done = store.get(j.id)
            assert done is not None and done.status is JobStatus.SUCCEEDED
            assert done.files == ["label.nii.gz", "summary.json"]
            assert (store.output_dir(j.id) / "label.nii.gz").is_file()
            assert not store.input_dir(j.id).exists()
        assert store.get(j2.id).status is JobStatus.CANCELLED  # type: ignore[union-attr]
        assert sorted(outcomes) == ["cancelled", "succeeded", "succeeded"]
        assert engine.calls == 2
    finally:
        mgr.stop()


def test_manager_cancels_running_job_and_reports_failures(tmp_path: Path) -> None:
    gate = threading.Event()
    engine = FakeEngine(gate, fail_on=10_000)
    store = JobStore(tmp_path / "store")
    mgr = JobManager(store, lambda: engine, LIMITS, workers=1, queue_limit=10)
    mgr.start()
    try:
        j1 = mgr.submit(_upload(tmp_path, 1), JobConfig())
        _wait(lambda: store.get(j1.id).status is JobStatus.RUNNING)  # type: ignore[union-attr]
        assert mgr.cancel(j1.id) is JobStatus.RUNNING
        gate.set()
        _wait(lambda: store.get(j1.id).status.terminal)  # type: ignore[union-attr]
        assert store.get(j1.id).status is JobStatus.CANCELLED  # type: ignore[union-attr]
        assert not store.output_dir(j1.id).exists()
        # a file that passes the upload checks but fails in the engine -> failed, typed
        engine.fail_on = 10.0
        j2 = mgr.submit(_upload(tmp_path, 2), JobConfig())
        _wait(lambda: store.get(j2.id).status.terminal)  # type: ignore[union-attr]
        failed = store.get(j2.id)
        assert failed is not None and failed.status is JobStatus.FAILED
        assert failed.error_type == "InvalidImageError" and "too bright" in str(
            failed.error_message)
    finally:
        mgr.stop()


def test_job_config_parsing_names_bad_keys() -> None:
    assert parse_job_config(b"threshold: 0.3\n").threshold == 0.3
    assert parse_job_config(b"").threshold is None
    with pytest.raises(ValueError, match="bogus"):
        parse_job_config(b"bogus: 1\n")
    with pytest.raises(ValueError, match="threshold"):
        parse_job_config(b"threshold: 2\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_job_config(b"- 1\n- 2\n")
    with pytest.raises(ValueError, match="YAML"):
        parse_job_config(b"a: [1\n")


def test_manager_expires_results_after_ttl(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "store")
    mgr = JobManager(store, FakeEngine, LIMITS, workers=1, queue_limit=10, result_ttl_s=0.3)
    mgr.start()
    try:
        job = mgr.submit(_upload(tmp_path, 1), JobConfig())
        _wait(lambda: store.get(job.id).status is JobStatus.EXPIRED)  # type: ignore[union-attr]
        _wait(lambda: not store.output_dir(job.id).exists())  # deleted right after
        assert store.get(job.id).files == []  # type: ignore[union-attr]
    finally:
        mgr.stop()
