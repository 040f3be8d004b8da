"""MONAI bundles, run as they are (a model format with its own pipeline): the bundle's
own pre-processing, network, inferer and post-processing, through
:class:`monai.bundle.ConfigParser`.

A bundle is a folder with ``configs/metadata.json``, an inference config
(``configs/inference.json`` / ``.yaml`` / ``.yml``) and ``models/model.pt`` (a state dict
for the config's ``network_def``) or ``models/model.ts`` (TorchScript). What
:class:`MonaiBundle` does for a scan, mirroring ``python -m monai.bundle run``:

1. the scan (a :class:`~medinfer.volume.Volume`) is written to a temporary NIfTI file,
   which is what the bundle's ``preprocessing`` (``LoadImaged`` ...) expects;
2. ``preprocessing({"image": path})`` -> the network input;
3. the bundle's ``inferer`` (e.g. ``SlidingWindowInferer``) with the network: the config's
   ``network_def`` loaded from ``models/model.pt`` with ``torch.load(weights_only=True)``,
   else ``models/model.ts``;
4. the bundle's ``postprocessing`` with writer transforms (``SaveImage(d)``) removed;
   ``Invertd`` brings the prediction back to the scan's grid;
5. the label map is checked against the scan's shape and affine (RAS+) and returned as a
   :class:`~medinfer.prediction.Prediction`.

Security: a bundle config is code. ``$`` expressions are evaluated with Python ``eval``
and ``_target_`` instantiates any importable class. Running one therefore needs an
explicit ``trust_model_code=True`` (CLI ``--trust-model-code``); without it a
:class:`~medinfer.errors.ModelError` says why. Only ``metadata.json`` (plain JSON) is
read before that.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medinfer.errors import GeometryError, ModelError
from medinfer.models.monai_bundle import (
    MAX_CONFIG_BYTES,
    TRUST_MESSAGE,
    bundle_label_names,
    find_inference_config,
    is_monai_bundle,
    read_bundle_metadata,
)

if TYPE_CHECKING:
    import torch

    from medinfer.prediction import Prediction
    from medinfer.volume import Volume

__all__ = ["MonaiBundle"]

_WRITERS = {"SaveImaged", "SaveImage"}


class MonaiBundle:
    """A MONAI bundle loaded for inference.

    Parameters
    ----------
    path : the bundle folder.
    trust_model_code : must be True: the bundle's config executes code (see module notes).
    device : ``auto``, ``cpu`` or ``cuda``; overrides the config's ``device``.
    image_key, pred_key : dictionary keys of the bundle's transforms (default ``image``
        and ``pred``, the MONAI model-zoo convention).

    Raises
    ------
    ModelError
        Not a bundle, ``trust_model_code`` not given, the config cannot be parsed, no
        weights, weights that do not fit ``network_def``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        trust_model_code: bool = False,
        device: str = "auto",
        image_key: str = "image",
        pred_key: str = "pred",
    ) -> None:
        from medinfer.models.loaders import resolve_device

        self.path = Path(path).resolve()
        if not is_monai_bundle(self.path):
            raise ModelError(f"{path}: not a MONAI bundle (expected configs/metadata.json and "
                             "configs/inference.json|yaml)")
        self.metadata = read_bundle_metadata(self.path)
        if not trust_model_code:
            raise ModelError(TRUST_MESSAGE.format(path=self.path))
        self.device = resolve_device(device)
        self.image_key, self.pred_key = image_key, pred_key
        cfg = find_inference_config(self.path)
        assert cfg is not None
        if cfg.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelError(f"{cfg}: larger than {MAX_CONFIG_BYTES} bytes")
        self.config_file = cfg
        self.parser = self._parser()
        self.network = self._load_network()
        try:
            self.preprocessing = self.parser.get_parsed_content("preprocessing")
            self.inferer = self.parser.get_parsed_content("inferer")
            post = self.parser.get_parsed_content("postprocessing") \
                if "postprocessing" in self.parser else None
        except Exception as exc:  # config code can raise anything
            raise ModelError(f"{cfg}: cannot build the bundle's transforms ({exc})") from None
        self.postprocessing = _without_writers(post)
        self.label_names = bundle_label_names(self.metadata)
        self.name = str(self.metadata.get("name", self.path.name))
        self.version = str(self.metadata.get("version", ""))

    @property
    def card(self) -> Any:
        """Display :class:`~medinfer.models.ModelCard` (label names from metadata
        ``channel_def``, colours) of the output label map."""
        from medinfer.models.nnunet import display_card

        names = self.label_names or {0: "background", 1: "foreground"}
        return display_card(self.name, names, "configs/metadata.json", self.version)

    def _parser(self) -> Any:
        try:
            from monai.bundle import ConfigParser
        except ImportError as exc:
            raise ModelError(f"MONAI bundles need monai ({exc})") from None
        parser = ConfigParser()
        try:
            parser.read_config(str(self.config_file))
            parser.read_meta(str(self.path / "configs" / "metadata.json"))
        except Exception as exc:  # YAML/JSON errors of several kinds
            raise ModelError(f"{self.config_file}: cannot read ({exc})") from None
        parser["bundle_root"] = str(self.path)
        parser["device"] = f"$torch.device('{self.device}')"
        return parser

    def _load_network(self) -> torch.nn.Module:
        import torch

        pt = self.path / "models" / "model.pt"
        ts = self.path / "models" / "model.ts"
        if pt.is_file() and "network_def" in self.parser:
            try:
                net = self.parser.get_parsed_content("network_def")
            except Exception as exc:  # config code can raise anything
                raise ModelError(f"{self.config_file}: cannot build network_def ({exc})"
                                 ) from None
            try:
                state = torch.load(str(pt), map_location="cpu", weights_only=True)
            except Exception as exc:  # restricted unpickler errors
                if isinstance(exc, MemoryError):
                    raise
                raise ModelError(f"{pt}: not a PyTorch state dict ({exc})") from None
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
            try:
                net.load_state_dict(state, strict=True)
            except (RuntimeError, TypeError) as exc:
                first = str(exc).strip().splitlines()[0][:300]
                raise ModelError(f"{pt}: weights do not match network_def ({first})") from None
            return net.to(self.device).eval()
        if ts.is_file():
            try:
                module = torch.jit.load(str(ts), map_location=self.device)
            except Exception as exc:  # torch.jit.load raises RuntimeError and others
                raise ModelError(f"{ts}: not a TorchScript model ({exc})") from None
            return module.eval()
        raise ModelError(f"{self.path}: no models/model.pt (with network_def) or models/model.ts")

    def predict(self, volume: Volume, progress: Callable[[str, float], None] | None = None
                ) -> Prediction:
        """Run the bundle on ``volume``; the label map is on its exact grid.

        Parameters
        ----------
        volume : ``(C, I, J, K)`` scan, affine voxel -> RAS+ mm.
        progress : optional ``progress(stage, fraction)``.

        Returns
        -------
        Prediction
            ``label`` ``(1, I, J, K)`` uint8/uint16 with ``volume.affine``; statistics
            per label found (names from metadata ``channel_def`` when present).

        Raises
        ------
        ModelError
            The bundle's transforms or network fail, or its output is not a label map on
            the scan's grid.
        """
        import torch

        from medinfer import io
        from medinfer.prediction import LabelStatistics, Prediction
        from medinfer.volume import Volume

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="medinfer-bundle-") as tmp:
            src = Path(tmp) / "image.nii.gz"
            io.save(volume if volume.num_channels > 1 else Volume(volume.array[0],
                                                                   volume.affine, volume.meta),
                    src)
            try:
                data = self.preprocessing({self.image_key: str(src)})
            except Exception as exc:  # bundle transforms raise many types
                raise ModelError(f"{self.name}: bundle preprocessing failed ({exc})") from None
            timings["preprocess"] = time.perf_counter() - t0
            if progress is not None:
                progress("preprocess", 0.2)
            t1 = time.perf_counter()
            x = data[self.image_key]
            with torch.inference_mode():
                try:
                    pred = self.inferer(x[None].to(self.device), self.network)
                except Exception as exc:  # network / inferer errors
                    raise ModelError(f"{self.name}: bundle inference failed ({exc})") from None
            timings["inference"] = time.perf_counter() - t1
            if progress is not None:
                progress("inference", 0.8)
            t2 = time.perf_counter()
            data[self.pred_key] = pred[0]
            try:
                out = self.postprocessing(data) if self.postprocessing is not None else data
            except Exception as exc:  # bundle transforms raise many types
                raise ModelError(f"{self.name}: bundle postprocessing failed ({exc})") from None
        lab_t = out[self.pred_key]
        arr = lab_t.detach().cpu().numpy() if hasattr(lab_t, "detach") else np.asarray(lab_t)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or tuple(arr.shape) != volume.spatial_shape:
            raise ModelError(
                f"{self.name}: bundle output shape {tuple(arr.shape)} is not a label map on the "
                f"scan grid {volume.spatial_shape} (does its postprocessing argmax and Invertd?)"
            )
        affine = getattr(lab_t, "affine", None)
        if affine is not None:
            a = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine,
                           dtype=np.float64)
            if a.shape == (4, 4) and not np.allclose(a, volume.affine, atol=1e-3):
                raise GeometryError(f"{self.name}: bundle output affine differs from the scan's")
        values = np.rint(arr).astype(np.int64)
        top = int(values.max()) if values.size else 0
        dtype = np.uint8 if top <= 255 else np.uint16
        labels = values.astype(dtype)
        label = Volume(labels[None], volume.affine, {"model": self.name})
        counts = np.bincount(labels.ravel())
        names = self.label_names or {v: f"label_{v}" for v in range(len(counts))}
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        stats = [LabelStatistics(value=v, name=n, voxels=int(counts[v]) if v < len(counts) else 0,
                                 volume_ml=(float(counts[v]) if v < len(counts) else 0.0)
                                 * voxel_ml)
                 for v, n in sorted(names.items()) if v != 0]
        timings["postprocess"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        if progress is not None:
            progress("postprocess", 1.0)
        return Prediction(label=label, statistics=stats, timings=timings,
                          model_name=self.name, model_version=self.version)


def _without_writers(post: Any) -> Any:
    """The postprocessing Compose without file writers (SaveImage / SaveImaged)."""
    if post is None:
        return None
    transforms = getattr(post, "transforms", None)
    if transforms is None:
        return None if type(post).__name__ in _WRITERS else post
    from monai.transforms import Compose

    kept = [t for t in transforms if type(t).__name__ not in _WRITERS]
    return Compose(kept)


