"""Batch runs that overlap I/O with compute.

While case ``n`` is being inferred, case ``n + 1`` is read and case ``n - 1`` is written,
each in its own thread (one reader, one writer). At most three cases are in memory at a
time (being written, being inferred, read ahead): the queue between the stages holds one
item each. Reading (nibabel / pydicom / gzip), writing (gzip compression) and torch
inference release the GIL for most of their work, so the stages really run side by side.

Results come back in input order. If any stage fails, no new case is started, the
write of a case already inferred is still completed (so every finished case has its
outputs), and the first error is raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

C = TypeVar("C")  # a case (e.g. an input path)
V = TypeVar("V")  # a loaded case (e.g. a Volume)
P = TypeVar("P")  # a prediction
R = TypeVar("R")  # what writing returns (e.g. output paths)

__all__ = ["BatchRunner", "StreamingPredictor", "open_predictor", "run_batch"]


class BatchRunner(Generic[C, V, P, R]):
    """Three-stage pipeline: ``load(case) -> infer(case, loaded) -> write(case, loaded, pred)``.

    Parameters
    ----------
    load : reads one case (runs in the reader thread).
    infer : runs the model (runs in the calling thread, which keeps the device).
    write : writes the outputs of one case, returns e.g. the written paths (writer thread).
    on_done : optional callback ``(index, case, result)`` after each write, in order
        (called in the calling thread).
    """

    def __init__(
        self,
        load: Callable[[C], V],
        infer: Callable[[C, V], P],
        write: Callable[[C, V, P], R],
        on_done: Callable[[int, C, R], None] | None = None,
    ) -> None:
        self.load = load
        self.infer = infer
        self.write = write
        self.on_done = on_done

    def run(self, cases: Sequence[C]) -> list[R]:
        """Process ``cases`` in order; returns the ``write`` results in order.

        Raises
        ------
        Exception
            The first error of any stage (after the pending write has finished).
        """
        results: list[R] = []
        if not cases:
            return results
        with ThreadPoolExecutor(1, thread_name_prefix="medinfer-read") as rpool, \
                ThreadPoolExecutor(1, thread_name_prefix="medinfer-write") as wpool:
            next_load: Future[V] | None = rpool.submit(self.load, cases[0])
            pending: tuple[int, C, Future[R]] | None = None
            try:
                for i, case in enumerate(cases):
                    assert next_load is not None
                    loaded = next_load.result()
                    next_load = rpool.submit(self.load, cases[i + 1]) \
                        if i + 1 < len(cases) else None
                    pred = self.infer(case, loaded)
                    if pending is not None:
                        self._finish(pending, results)
                    pending = (i, case, wpool.submit(self.write, case, loaded, pred))
                    del loaded, pred
                if pending is not None:
                    p, pending = pending, None
                    self._finish(p, results)
            finally:
                if next_load is not None:
                    next_load.cancel()
                if pending is not None:  # an error happened: still finish that write
                    pending[2].exception()
        return results

    def _finish(self, pending: tuple[int, C, Future[R]], results: list[R]) -> None:
        i, case, fut = pending
        res = fut.result()
        results.append(res)
        if self.on_done is not None:
            self.on_done(i, case, res)


def run_batch(
    cases: Sequence[C],
    load: Callable[[C], V],
    infer: Callable[[C, V], P],
    write: Callable[[C, V, P], R],
    on_done: Callable[[int, C, R], None] | None = None,
) -> list[R]:
    """Shortcut for ``BatchRunner(load, infer, write, on_done).run(cases)``."""
    return BatchRunner(load, infer, write, on_done).run(cases)


class StreamingPredictor:
    """A :class:`~medinfer.inference.Predictor` whose ``predict`` streams.

    ``predict(volume, progress)`` is :func:`medinfer.inference.streaming.predict_streaming`
    (float32 accumulation: the same labels as the full-volume path, peak memory of one
    slab); detection and whole-volume models fall back to the full-volume path.
    """

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.card = predictor.card

    def predict(self, volume: Any, progress: Callable[[str, float], None] | None = None
                ) -> Any:
        from medinfer.inference.streaming import predict_streaming

        return predict_streaming(self.predictor, volume, progress)


def open_predictor(
    model: str,
    *,
    device: str = "auto",
    tta: bool | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    save_probabilities: bool = False,
    stream: bool = True,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
    trust_model_code: bool = False,
) -> tuple[Any, Any]:
    """Open any supported model for ``medinfer predict``: ``(display card, predictor)``.

    ``model`` is a medinfer model folder / ``model.yaml`` / bundled name, an nnU-Net v2
    model folder (``dataset.json`` + ``plans.json`` + ``fold_*``) or a MONAI bundle
    (``configs/metadata.json``). The predictor has ``predict(volume, progress) ->
    Prediction``; the card gives label names and colours for tables, overlays and
    ``<case>_stats.json``.

    Parameters
    ----------
    tta : None = the model's default (card axes; nnU-Net: on); False/True.
    stream : medinfer cards: streaming engine (exact, lean; default) or the full-volume
        path. nnU-Net folders always stream; MONAI bundles run their own inferer.
    folds, checkpoint : nnU-Net only (default: all folds, ``final``).
    trust_model_code : MONAI bundles only; required to run their config code.

    Raises
    ------
    ModelError, ConfigError
        Unknown model, invalid files or options (e.g. ``--folds`` for a medinfer card).
    """
    from medinfer.errors import ConfigError
    from medinfer.models.monai_bundle import MonaiBundle, is_monai_bundle
    from medinfer.models.nnunet import NnUNetPredictor, is_nnunet_folder

    if is_nnunet_folder(model):
        if overlap is not None and not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap: expected 0 <= overlap < 1, got {overlap}")
        nn = NnUNetPredictor(model, folds=folds, checkpoint=checkpoint, device=device,
                             tta=True if tta is None else tta,
                             step_size=0.5 if overlap is None else 1.0 - overlap,
                             save_probabilities=save_probabilities, batch_size=batch_size)
        return nn.card, nn
    if folds is not None or checkpoint != "final":
        raise ConfigError(f"--folds / --checkpoint apply to nnU-Net model folders only; "
                          f"{model!r} is not one (dataset.json, plans.json, fold_*/)")
    if is_monai_bundle(model):
        bundle = MonaiBundle(model, trust_model_code=trust_model_code, device=device)
        return bundle.card, bundle
    from medinfer.inference.predictor import Predictor
    from medinfer.models.loaders import load_model, resolve_model

    card, model_dir = resolve_model(model)
    net = load_model(card, model_dir, device)
    pred = Predictor(card, net, device=device, tta=tta, overlap=overlap,
                     batch_size=batch_size, save_probabilities=save_probabilities)
    return card, (StreamingPredictor(pred) if stream else pred)
