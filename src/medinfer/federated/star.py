"""FLAME STAR node: ``NnUNetAnalyzer``, ``PassThroughAggregator`` and ``main()``.

Written against the published interface of the FLAME SDK (``flame.star``, PrivateAIM
``python-sdk``): an analyzer is built as ``Analyzer(flame)`` and called as
``analysis_method(data, aggregator_results)``; an aggregator as ``Aggregator(flame)`` with
``aggregation_method(analysis_results)`` and ``has_converged(result, last_result)``;
:func:`main` starts ``StarModel(analyzer=..., aggregator=..., data_type="s3",
simple_analysis=True, output_type="bytes")`` as seed 004 shows.

When ``flame`` is importable our classes subclass its ``StarAnalyzer`` / ``StarAggregator``
(resolved at import time of this module); otherwise minimal bases of ours with the same
interface, so the node runs (``medinfer federated run-local``) without the SDK.

The analyzer's configuration (model, folds, TTA, multi-modal, work folder) comes from
environment variables (:meth:`medinfer.federated.analyzer.NodeConfig.from_env`), because the
SDK constructs the analyzer itself; :meth:`NnUNetAnalyzer.configured` makes a subclass
bound to an explicit :class:`~medinfer.federated.analyzer.NodeConfig`.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from medinfer.errors import ConfigError
from medinfer.federated.analyzer import NodeConfig, run_analysis

__all__ = ["NnUNetAnalyzer", "PassThroughAggregator", "main", "sdk_bases"]


class _AnalyzerBase:
    """Stand-in for ``flame.star.StarAnalyzer`` when the SDK is absent (same interface)."""

    def __init__(self, flame: Any = None) -> None:
        self.flame = flame

    def analysis_method(self, data: Any, aggregator_results: Any) -> Any:
        raise NotImplementedError


class _AggregatorBase:
    """Stand-in for ``flame.star.StarAggregator`` when the SDK is absent (same interface)."""

    def __init__(self, flame: Any = None) -> None:
        self.flame = flame

    def aggregation_method(self, analysis_results: Any) -> Any:
        raise NotImplementedError

    def has_converged(self, result: Any, last_result: Any) -> bool:
        raise NotImplementedError


def sdk_bases() -> tuple[type, type, bool]:
    """``(analyzer base, aggregator base, from_sdk)``: the SDK's when ``flame.star`` imports."""
    try:
        star = importlib.import_module("flame.star")
    except ImportError:
        return _AnalyzerBase, _AggregatorBase, False
    return star.StarAnalyzer, star.StarAggregator, True


_ANALYZER_BASE, _AGGREGATOR_BASE, FROM_SDK = sdk_bases()


class NnUNetAnalyzer(_ANALYZER_BASE):  # type: ignore[misc, valid-type]
    """Segment the images a site hands over and return the results as bytes.

    ``analysis_method(data, aggregator_results)`` runs
    :func:`medinfer.federated.analyzer.run_analysis` on ``data`` (the SDK's
    ``data_type="s3"`` list of ``{key: bytes}`` dicts, raw bytes, ``{filename: bytes}``,
    nested lists; TAR / zip archives unpacked safely) and returns ``{"status": "done",
    "dicom_seg_bytes": {"<case>.dcm": bytes}, "nifti_seg_bytes": {"<case>.nii.gz": bytes},
    "report": {...}}`` (``"status": "failed"`` with ``"reason"`` when nothing could be
    processed). The model is opened once per analyzer and reused.
    """

    config: ClassVar[NodeConfig | None] = None

    def __init__(self, flame: Any = None) -> None:
        super().__init__(flame)
        self.node_config = type(self).config or NodeConfig.from_env()
        self._model: tuple[Any, Any] | None = None

    @classmethod
    def configured(cls, config: NodeConfig) -> type[NnUNetAnalyzer]:
        """A subclass bound to ``config`` (for ``StarModel(analyzer=...)`` / run-local)."""
        return type(cls.__name__, (cls,), {"config": config})

    def _opened(self) -> tuple[Any, Any]:
        from medinfer.federated.analyzer import open_node_model

        if self._model is None:
            self._model = open_node_model(self.node_config)
        return self._model

    def analysis_method(self, data: Any, aggregator_results: Any) -> dict[str, Any]:
        """One analysis round; ``aggregator_results`` is unused (one round only)."""
        return run_analysis(data, self.node_config, model=self._opened)


class PassThroughAggregator(_AGGREGATOR_BASE):  # type: ignore[misc, valid-type]
    """Returns the analysis results unchanged; converged after the first round."""

    def aggregation_method(self, analysis_results: Any) -> Any:
        """The results as they came (a list of per-node results)."""
        return analysis_results

    def has_converged(self, result: Any, last_result: Any) -> bool:
        """Always ``True``: one analysis round (``simple_analysis=True``)."""
        return True


def main() -> Any:
    """Start the FLAME node: ``StarModel(analyzer=NnUNetAnalyzer,
    aggregator=PassThroughAggregator, data_type="s3", simple_analysis=True,
    output_type="bytes")``.

    Raises
    ------
    ConfigError
        The FLAME SDK (package ``flame``, module ``flame.star``) is not installed.
    """
    try:
        star = importlib.import_module("flame.star")
    except ImportError as exc:
        raise ConfigError(
            "medinfer federated node: the FLAME SDK is not installed (the 'flame' package, "
            "module 'flame.star', from PrivateAIM's python-sdk; it is not on PyPI). Install "
            f"it in the node image; the analysis itself runs without it: "
            f"'medinfer federated run-local' ({exc})") from None
    analyzer: type = NnUNetAnalyzer
    aggregator: type = PassThroughAggregator
    if not (issubclass(analyzer, star.StarAnalyzer)
            and issubclass(aggregator, star.StarAggregator)):
        # this module was imported before the SDK became importable: define the classes
        # again on the SDK's bases
        module = importlib.reload(importlib.import_module(__name__))
        analyzer, aggregator = module.NnUNetAnalyzer, module.PassThroughAggregator
    return star.StarModel(analyzer=analyzer, aggregator=aggregator, data_type="s3",
                          simple_analysis=True, output_type="bytes")


def entrypoint() -> None:
    """The container entrypoint (``python -m medinfer.federated.star``): :func:`main`, with a
    one-line message on stderr and exit code 2 for a missing SDK or a bad configuration."""
    import sys

    from medinfer.errors import MedinferError

    try:
        main()
    except MedinferError as exc:
        sys.stderr.write(f"medinfer federated node: error: {exc}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    entrypoint()
