"""Run a model over many scans on a Ray cluster (optional extra ``medinfer[ray]``).

One actor per GPU (or per ``cpus_per_worker`` CPUs) opens the model once; the driver
plans the run exactly as a local batch does (:mod:`medinfer.batch`: case ids, skip /
resume, the run manifest) and hands out one case at a time to each actor, keeping at
most ``2`` cases queued per actor (backpressure: cases are read by the worker that runs
them, never shipped through the driver). Each worker reads its case, runs it and writes
all files atomically into the shared output folder, or, with ``return_outputs=True``
(no shared file system), sends the files back and the driver writes them atomically.
A case whose worker dies (actor killed, node lost) or that fails is retried once on
another worker (``max_retries``), then recorded as failed.

Works with a cluster started by ``ray start --head`` / ``ray start --address`` (pass
``address``, or call ``ray.init(address='auto')`` first) and with a local ``ray.init()``.

References: Ray actors and ``ray.wait`` (https://docs.ray.io/en/latest/ray-core/actors.html).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medinfer.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from medinfer.batch import CaseRecord, CaseSpec, RunInfo

log = logging.getLogger(__name__)

__all__ = ["ACTOR_NAME_PREFIX", "distributed_inference", "fill_bare_ray_option", "import_ray",
           "run_on_ray"]

#: Ray actor names start with this (``<prefix><run>-<n>``), e.g. for monitoring
ACTOR_NAME_PREFIX = "medinfer-worker-"
_QUEUE_PER_ACTOR = 2


_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[A-Za-z0-9_.-]+:\d+)$")


def fill_bare_ray_option(argv: Sequence[str]) -> list[str]:
    """``--ray`` without an address -> ``--ray local`` (typer options need a value).

    The token after ``--ray`` is its value only when it looks like an address
    (``auto``, ``local``, ``ray://...``, ``host:port``), so inputs after it stay inputs.
    """
    args = list(argv)
    out: list[str] = []
    for i, token in enumerate(args):
        out.append(token)
        if token == "--ray" and (i + 1 == len(args) or not _ADDRESS.match(args[i + 1])):
            out.append("local")
    return out


def import_ray() -> Any:
    """``import ray`` or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray: Ray is not installed; install it with "
                          "pip install 'medinfer[ray]'") from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Connect unless already connected; True when this call started the connection."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address not in (None, "", "local"):
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"--ray {address}: cannot connect to a Ray cluster ({exc}); start "
                          f"one with 'ray start --head' or omit the address") from None
    return True


class _Worker:
    """The actor body: one opened model; ``process(spec)`` runs one case."""

    def __init__(self, predictor_kwargs: Mapping[str, Any], output_dir: str, info: RunInfo,
                 series: str | None, overlay: bool, write_options: Mapping[str, Any] | None,
                 return_outputs: bool, threads: int) -> None:
        import torch

        from medinfer.batch import CaseProcessor

        torch.set_num_threads(max(1, threads))
        self.return_outputs = return_outputs
        self.local_dir = tempfile.mkdtemp(prefix="medinfer-ray-") if return_outputs else None
        self.proc = CaseProcessor(predictor_kwargs, self.local_dir or output_dir, info,
                                  series=series, overlay=overlay, write_options=write_options)

    def where(self) -> str:
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"

    def process(self, spec: CaseSpec) -> tuple[CaseRecord, dict[str, bytes] | None]:
        rec = self.proc.process(spec, worker=self.where())
        if not self.return_outputs or rec.status != "ok":
            return rec, None
        files: dict[str, bytes] = {}
        for name in rec.outputs:
            p = Path(str(self.local_dir)) / name
            files[name] = p.read_bytes()
            p.unlink()
        return rec, files

    def close(self) -> None:
        if self.local_dir:
            shutil.rmtree(self.local_dir, ignore_errors=True)


def _write_returned(output_dir: Path, rec: CaseRecord, files: Mapping[str, bytes]) -> None:
    """Write a case's returned files atomically, the stats file (the case's index) last."""
    from medinfer._atomic import write_bytes_atomic

    stats = f"{rec.id}_stats.json"
    for name in sorted(files, key=lambda n: n == stats):
        write_bytes_atomic(output_dir / name, files[name])


def run_on_ray(
    specs: Sequence[CaseSpec],
    predictor_kwargs: Mapping[str, Any],
    output_dir: Path,
    info: RunInfo,
    *,
    address: str | None = None,
    series: str | None = None,
    overlay: bool = False,
    write_options: Mapping[str, Any] | None = None,
    num_gpus: int = 0,
    num_workers: int | None = None,
    cpus_per_worker: int = 1,
    max_retries: int = 1,
    return_outputs: bool = False,
) -> Iterator[CaseRecord]:
    """Run ``specs`` on Ray actors; yield one final record per case as cases finish.

    Parameters
    ----------
    specs : the cases to run (planned by :func:`medinfer.batch.plan_cases`).
    predictor_kwargs : :func:`medinfer.formats.open_predictor` arguments (each actor
        opens its own model; ``device`` becomes ``cuda`` on GPU actors).
    output_dir : the output folder (shared by the workers unless ``return_outputs``).
    address : Ray address (``None``/``""``: connect as ``ray.init()`` does).
    num_gpus : GPUs to use, one actor per GPU; 0 = CPU actors. More than the cluster
        has: as many as it has (none: CPU actors), with a warning.
    num_workers : CPU actors (default and at most: cluster CPUs // ``cpus_per_worker``).
    cpus_per_worker : CPUs (and torch threads) per CPU actor.
    max_retries : how often a failed case (or a case whose worker died) is retried.
    return_outputs : send the files to the driver, which writes them (no shared disk).

    Raises
    ------
    ConfigError
        Ray missing, no cluster at ``address``, or bad worker counts.
    ModelError
        The workers cannot open the model (the first worker's error).
    """
    from medinfer.batch import CaseRecord, CaseStatus

    ray = import_ray()
    if num_gpus < 0 or cpus_per_worker < 1 or (num_workers is not None and num_workers < 1):
        raise ConfigError(f"Ray workers: expected num_gpus >= 0, cpus_per_worker >= 1, "
                          f"num_workers >= 1; got {num_gpus}, {cpus_per_worker}, "
                          f"{num_workers}")
    started = _connect(ray, address)
    try:
        # never ask for more than the cluster has: actors that cannot be placed would
        # hold their queued cases forever
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        if cpus_per_worker > max(cpus, 1):
            raise ConfigError(f"cpus_per_worker: {cpus_per_worker} is more than the Ray "
                              f"cluster's {cpus} CPU(s)")
        fit = max(1, cpus // cpus_per_worker)
        if num_gpus > gpus:
            log.warning("num_gpus=%d but the Ray cluster has %d GPU(s): using %s", num_gpus,
                        gpus, f"{gpus} GPU worker(s)" if gpus else "CPU workers")
            num_gpus = gpus
        if num_gpus:
            n_actors = min(num_gpus, fit)
            options: dict[str, Any] = {"num_gpus": 1, "num_cpus": cpus_per_worker}
            kwargs = {**predictor_kwargs, "device": "cuda"}
        else:
            if num_workers is not None and num_workers > fit:
                log.warning("num_workers=%d: the Ray cluster fits %d worker(s) of %d CPU(s)",
                            num_workers, fit, cpus_per_worker)
            n_actors = min(num_workers or fit, fit)
            options = {"num_cpus": cpus_per_worker}
            kwargs = {**predictor_kwargs, "device": "cpu"}
        n_actors = max(1, min(n_actors, len(specs)))
        # medinfer settings that travel as environment variables (e.g.
        # MEDINFER_ALLOW_MISSING_SLICES) reach the workers on every node
        env = {k: v for k, v in os.environ.items() if k.startswith("MEDINFER_")}
        if env:
            options["runtime_env"] = {"env_vars": env}
        remote_cls = ray.remote(_Worker)
        run_tag = os.urandom(4).hex()
        made = 0

        def new_actor() -> Any:
            nonlocal made
            made += 1
            return remote_cls.options(name=f"{ACTOR_NAME_PREFIX}{run_tag}-{made}",
                                      max_restarts=0, **options).remote(
                kwargs, str(output_dir), info, series, overlay, dict(write_options or {}),
                return_outputs, cpus_per_worker)

        actors = [new_actor() for _ in range(n_actors)]
        try:  # a model that cannot be opened fails the run once, not every case twice
            ray.get([a.where.remote() for a in actors])
        except ray.exceptions.RayActorError as exc:
            raise ModelError(f"Ray workers cannot open the model "
                             f"{predictor_kwargs.get('model')!r}: {_creation_error(exc)}"
                             ) from None
        queue: deque[tuple[CaseSpec, int]] = deque((s, 0) for s in specs)
        in_flight: dict[Any, tuple[int, Any, CaseSpec, int]] = {}
        load = dict.fromkeys(range(len(actors)), 0)

        def submit() -> None:
            while queue:
                free = [i for i, n in load.items() if n < _QUEUE_PER_ACTOR]
                if not free:
                    return
                i = min(free, key=lambda k: load[k])
                spec, tries = queue.popleft()
                ref = actors[i].process.remote(spec)
                in_flight[ref] = (i, actors[i], spec, tries)
                load[i] += 1

        submit()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            i, actor, spec, tries = in_flight.pop(ref)
            load[i] -= 1
            files: dict[str, bytes] | None = None
            try:
                rec, files = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as exc:
                log.warning("case %s: worker lost (%s); %s", spec.case_id, type(exc).__name__,
                            "retrying" if tries < max_retries else "giving up")
                rec = CaseRecord.for_spec(spec, info, CaseStatus.FAILED,
                                          error=f"Ray worker lost ({type(exc).__name__})")
                if actors[i] is actor:
                    # replace the dead actor (its other queued cases fail and retry too)
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                    actors[i] = new_actor()
            except ray.exceptions.RayTaskError as exc:  # a bug in the worker code itself
                rec = CaseRecord.for_spec(spec, info, CaseStatus.FAILED,
                                          error=f"{type(exc.cause).__name__}: {exc.cause}")
            rec.attempts = tries + 1
            if rec.status == CaseStatus.FAILED and tries < max_retries:
                queue.appendleft((spec, tries + 1))
            else:
                if files is not None:
                    _write_returned(output_dir, rec, files)
                yield rec
            submit()
        for a in actors:
            with contextlib.suppress(Exception):
                ray.get(a.close.remote(), timeout=30)
            with contextlib.suppress(Exception):
                ray.kill(a)
    finally:
        if started:
            ray.shutdown()


def _creation_error(exc: Exception) -> str:
    """The last line of a Ray actor's creation error (``module.Type: message``), short."""
    text = str(getattr(exc, "error_msg", "") or exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^[\w.]+\.(\w+Error): ", r"\1: ", last)


def distributed_inference(
    checkpoint: str | os.PathLike[str],
    input_paths: Sequence[str | os.PathLike[str]],
    num_gpus: int = 0,
    batch_size: int | None = None,
    output_dir: str | os.PathLike[str] = "results",
    *,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: int = 1,
    max_retries: int = 1,
    return_outputs: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run a model over ``input_paths`` on Ray; the run summary (as :func:`medinfer.batch.run`).

    Parameters
    ----------
    checkpoint : the model: a medinfer model folder / ``model.yaml`` / bundled name, an
        nnU-Net v2 folder or a MONAI bundle.
    input_paths : NIfTI files, folders of NIfTI files, DICOM files or folders.
    num_gpus : GPUs to use, one worker (actor holding the model) per GPU; 0 = CPU workers.
    batch_size : sliding windows per network call (default: the model card's).
    output_dir : the output folder (on a file system all workers share, unless
        ``return_outputs``); ``<case>_seg.nii.gz``, ``<case>_stats.json``, ...,
        ``run.json`` and ``cases.csv`` as :func:`medinfer.batch.run` writes them.
    address : Ray address; ``None`` uses the current connection (``ray.init(
        address='auto')`` done by the caller) or ``ray.init()``'s default.
    num_workers, cpus_per_worker : CPU workers and CPUs (torch threads) each.
    max_retries : retries of a failed case or a case whose worker died.
    return_outputs : workers send the files to the driver, which writes them.
    **options : further :func:`medinfer.batch.run` options (``skip_existing``,
        ``overwrite``, ``keep_going`` (default True), ``name_by``, ``tta``, ``series``,
        ``save_probabilities``, ``num_parts``, ``part_id``, ...).

    Returns
    -------
    dict
        ``counts`` (``ok``, ``skipped``, ``failed``, ``total``), ``exit_code``,
        ``manifest``, ``cases`` (one row per case: id, source, status, error, attempts,
        worker, timings, outputs, model hash).

    Raises
    ------
    ConfigError
        Ray not installed (``pip install 'medinfer[ray]'``), no cluster, bad options.
    MedinferError
        Bad model or inputs.
    """
    from medinfer.batch import run

    import_ray()
    options.setdefault("keep_going", True)
    return run(list(input_paths), model=str(checkpoint), output_dir=output_dir,
               batch_size=batch_size, ray="" if address is None else address,
               ray_options={"num_gpus": num_gpus, "num_workers": num_workers,
                            "cpus_per_worker": cpus_per_worker, "max_retries": max_retries,
                            "return_outputs": return_outputs},
               **options)
