"""Ray: a local ray.init(num_cpus=2) and a `ray start --head` + `ray start --address` cluster
on loopback run the same cases as the local batch, with the same outputs; a killed worker
actor's cases are retried."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import ray
from batch_helpers import final_files, manifest, write_nifti

from medinfer.cli import main
from medinfer.distributed import ACTOR_NAME_PREFIX, distributed_inference

N_CASES = 16  # enough that the run outlasts the killer's reaction


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[Path, Path]:
    """``N_CASES`` NIfTI cases and their outputs from the local (non-Ray) batch run."""
    root = tmp_path_factory.mktemp("cohort")
    folder = root / "in"
    folder.mkdir()
    for i in range(N_CASES):
        write_nifti(folder / f"r{i}.nii.gz", 100 + i)
    assert _run(["predict", str(folder), "-m", str(model_dir), "-o", str(root / "local"),
                 "--device", "cpu"]) == 0
    return folder, root / "local"


def _same_outputs(out: Path, local: Path) -> None:
    for i in range(N_CASES):
        a = nib.load(str(out / f"r{i}_seg.nii.gz"))
        b = nib.load(str(local / f"r{i}_seg.nii.gz"))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_allclose(a.affine, b.affine)
    run = manifest(out)
    assert run["counts"] == {"ok": N_CASES, "skipped": 0, "failed": 0, "total": N_CASES}
    assert sorted(c["id"] for c in run["cases"]) == sorted(f"r{i}" for i in range(N_CASES))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             _temp_dir=tmp)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def test_local_ray_equals_local_run_and_survives_a_killed_worker(
        local_ray: None, cohort: tuple[Path, Path], model_dir: Path, tmp_path: Path) -> None:
    folder, local = cohort
    # kill one worker actor as soon as the first case is written: its cases are retried
    out2 = tmp_path / "killed"
    killed: list[str] = []
    before = set(ray.util.list_named_actors())

    def killer() -> None:
        # the actor handle is taken while the run starts, so the kill follows the first
        # written case within one poll (a lookup after it can find the run finished)
        deadline = time.monotonic() + 300
        handle: tuple[str, object] | None = None
        while time.monotonic() < deadline:
            if handle is None:
                mine = sorted(n for n in ray.util.list_named_actors()
                              if n.startswith(ACTOR_NAME_PREFIX) and n not in before)
                if mine:
                    handle = (mine[0], ray.get_actor(mine[0]))
            if handle is not None and any(out2.glob("*_stats.json")):
                ray.kill(handle[1], no_restart=True)
                killed.append(handle[0])
                return
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    # the CLI, on the Ray instance this process started (--ray without an address)
    code = _run(["predict", str(folder), "-m", str(model_dir), "-o", str(out2), "--ray"])
    t.join()
    assert killed and code == 0
    _same_outputs(out2, local)
    cases = manifest(out2)["cases"]
    assert sum(c["attempts"] for c in cases) > N_CASES  # some case ran twice
    assert all(c["attempts"] <= 2 for c in cases)
    assert len({c["worker"] for c in cases}) >= 2
    assert not [n for n in os.listdir(out2) if ".part" in n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ray_start_cluster_head_and_worker(local_ray: None, cohort: tuple[Path, Path],
                                           model_dir: Path, tmp_path: Path) -> None:
    ray.shutdown()  # this test talks to a separate cluster
    folder, local = cohort
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block", "--disable-usage-stats"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--include-dashboard", "false", "--temp-dir", tmp, *common],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [head]
    try:
        address = f"127.0.0.1:{port}"
        worker = subprocess.Popen(
            [ray_bin, "start", "--address", address, "--node-ip-address", "127.0.0.1",
             *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(worker)
        ray.init(address=address, log_to_driver=False)
        deadline = time.monotonic() + 240
        while ray.cluster_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        out = tmp_path / "cluster"
        # the call of the PIVOT guide; no GPU in this cluster: CPU workers, one per node
        summary = distributed_inference(str(model_dir), [folder], num_gpus=1, batch_size=2,
                                        output_dir=out, return_outputs=True)
        assert summary["counts"]["ok"] == N_CASES
        _same_outputs(out, local)
        assert len({c["worker"].split(":")[-1] for c in summary["cases"]}) == 2
        assert final_files(out) == final_files(local)
        # resume semantics are the same as a local batch: nothing left to do
        again = distributed_inference(str(model_dir), [folder], output_dir=out,
                                      skip_existing=True)
        assert again["counts"] == {"ok": 0, "skipped": N_CASES, "failed": 0,
                                   "total": N_CASES}
    finally:
        ray.shutdown()
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
