"""Bounded fuzz run (issue 18): >= 500 hostile inputs through the readers and the server.

Every input goes through :func:`medinfer.io.load` and
:func:`medinfer.data.prepare.load_image` in memory-limited worker subprocesses
(``fuzz_runner``: ``RLIMIT_AS`` = start-up size + 1.5 GiB, 10 s per input); every outcome
must be a success with finite values or a ``medinfer.errors`` type. A share of the
corpus is uploaded to one real uvicorn on loopback; every answer must be 200 or a 4xx
JSON error body, within 10 s, and the server's peak RSS stays under 2 GiB.
The long run with the summary table is ``benchmarks/fuzz.py --n 10000``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))

from _serve_support import Server, make_tiny_model
from fuzz_corpus import generate
from fuzz_runner import run_inputs

N_INPUTS = 500
N_HTTP = 120
SEED = 18


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("fuzz_corpus")
    files = []
    for i, (name, data) in enumerate(generate(N_INPUTS, seed=SEED)):
        p = folder / f"{i:05d}"
        p.write_bytes(data)
        files.append((name, p))
    return files


def test_fuzz_readers_clean_outcomes_bounded(corpus: list[tuple[str, Path]]) -> None:
    results = run_inputs(corpus, ("io", "data"), workers=2, timeout_s=10.0, mem_mb=1536)
    assert len(results) == 2 * N_INPUTS
    bad = [r for r in results
           if r.outcome not in ("ok", "clean") or not r.finite or r.seconds > 10.0]
    report = "\n".join(f"{r.name} [{r.target}] {r.outcome} {r.type}: {r.message[:200]}"
                       for r in bad[:20])
    assert not bad, f"{len(bad)} unclean outcomes:\n{report}"
    counts = Counter(r.outcome for r in results)
    # the corpus exercises both paths: valid scans load, hostile ones are refused
    assert counts["ok"] >= 0.05 * len(results) and counts["clean"] >= 0.3 * len(results)
    # the reproducers of issue 18 are all among the inputs
    assert {r.name for r in results if r.name.startswith("r0")} >= {
        "r01_enhanced_1e6_frames", "r03_gz_scaled_u8", "r07_slope_1e308"}


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_fuzz_http_upload_answers_200_or_4xx_json(corpus: list[tuple[str, Path]],
                                                  tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", spacing=(2.0, 2.0, 2.0))
    env = {"MEDINFER_MODEL": str(model), "MEDINFER_JOB_STORE": str(tmp_path / "store"),
           "MEDINFER_WORKERS": "2", "MEDINFER_MAX_UPLOAD_BYTES": str(4 * 1024**2),
           "MEDINFER_MAX_UNPACKED_BYTES": str(256 * 1024**2),
           "MEDINFER_MAX_IMAGE_BYTES": str(256 * 1024**2)}
    srv = Server(env, tmp_path / "server.log")
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=10.0) as http:
            for name, path in corpus[:N_HTTP]:
                try:
                    r = http.post("/v1/predict", files={"file": (name, path.read_bytes())})
                except httpx.HTTPError as exc:
                    bad.append(f"{name}: {type(exc).__name__}: {exc}")
                    if srv.proc.poll() is not None:
                        break
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    continue
                ok = 400 <= r.status_code < 500
                try:
                    body = r.json()
                    ok = ok and set(body) == {"error"} and body["error"]["status"] == \
                        r.status_code
                except ValueError:
                    ok = False
                if not ok:
                    bad.append(f"{name}: {r.status_code} {r.text[:200]}")
        peak_mib = _vm_hwm_kib(srv.proc.pid) / 1024
    finally:
        srv.stop()
    assert not bad, "\n".join(bad[:20]) + "\n" + (tmp_path / "server.log").read_text()[-3000:]
    assert statuses[200] > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0, statuses
    assert peak_mib < 2048, peak_mib
