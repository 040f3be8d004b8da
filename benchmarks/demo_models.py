"""Benchmark: the bundled demo models against the targets of issue 16.

``demo-nodules`` (heat-map detector of synthetic lesions) on the held-out set checked into
``tests/data/nodules_heldout/`` (16 scans, 96 lesions, seed 20261130; see
:mod:`medinfer.training.nodules_eval`) plus ``--extra-scans`` more scans of the same
construction (seed 20261131) made here, at the default threshold (card defaults, no TTA):
sensitivity for lesions >= 5 mm and 4-5 mm, false positives per scan away from the host's
lesion-like structures, centre error, diameter error (%) for lesions >= 5 mm, ROC AUC of
the confidence (true vs false findings), ECE before and after calibration, CPM (FROC).

The calibration is the shipped ``calibration.json`` of the model folder, or, with
``--fit-calibration OUT.json``, a new one: the model is run on a separate calibration set
(seed 720261130, ``--calibration-scans`` scans, default 32), the true / non-lesion findings
are written to ``OUT.csv`` and ``medinfer calibrate OUT.csv --method isotonic -o OUT.json`` fits it.

``--compare FOLDER`` adds the column of another demo-nodules model folder (e.g. the previous
weights: ``git show <rev>:src/medinfer/models/zoo/demo-nodules/model.pt > old/model.pt`` with
the card copied next to it). ``--brain`` also runs ``demo-brain`` on the seven frames of
``tests/test_acceptance_geometry.py`` (Predictor with the card's defaults, TTA off) and
prints Dice of CSF, GM and WM per frame.

Usage::

    .venv/bin/python benchmarks/demo_models.py [--extra-scans 8] [--compare DIR]
        [--fit-calibration outputs/cal/calibration.json] [--brain] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "tests" / "data" / "nodules_heldout"
ATLAS = REPO / "tests" / "data" / "ct" / "ct_head_brain_atlas_1mm.nii.gz"
EXTRA_SEED = 20261131

#: the issue's targets for demo-nodules
TARGETS = {"sensitivity_ge5": ">= 0.95", "sensitivity_4_5": ">= 0.7", "fp_per_scan": "<= 0.5",
           "centre_error_max_mm": "<= 1", "diameter_error_max_pct": "<= 15",
           "auc_confidence": ">= 0.9", "ece_after": "<= 0.05"}


def _open(model: str) -> tuple[Any, Any, Path]:
    from medinfer.models import load_model, resolve_model

    card, folder = resolve_model(model)
    return card, load_model(card, folder, "cpu"), Path(folder)


def nodules(model: str, atlas: Any, extra: int, calibration: Path | None,
            fit: Path | None, cal_scans: int, confidence: str = "mean") -> dict[str, Any]:
    """Evaluate one demo-nodules model folder; returns the summary (plus timings).

    ``confidence``: ``post_processing.confidence`` (``mean`` or ``peak``)."""
    from medinfer.postprocess.calibration import Calibration
    from medinfer.training.nodules_eval import (
        CALIBRATION_SEED,
        as_refs,
        evaluate_detector,
        heldout_scans,
        read_heldout_set,
        summarize,
        write_labelled_csv,
    )

    card, net, folder = _open(model)
    t0 = time.perf_counter()
    cases: list[tuple[str, Any, Any]] = list(read_heldout_set(HELDOUT))
    cases += [(c, s.image, as_refs(s.lesions)) for c, s in heldout_scans(atlas, EXTRA_SEED, extra)]
    config = {"post_processing": {"confidence": confidence}}
    results = evaluate_detector(cases, card, net, atlas, config)
    t_eval = time.perf_counter() - t0
    cal = None
    if fit is not None:
        cal_cases = [(c, s.image, as_refs(s.lesions))
                     for c, s in heldout_scans(atlas, CALIBRATION_SEED, cal_scans)]
        cal_results = evaluate_detector(cal_cases, card, net, atlas, config)
        csv_path = write_labelled_csv(cal_results, fit.with_suffix(".csv"))
        subprocess.run([sys.executable, "-m", "medinfer", "calibrate", str(csv_path),
                        "--method", "isotonic", "-o", str(fit)], check=True)
        cal = Calibration.load(fit)
    elif calibration is not None and calibration.is_file():
        cal = Calibration.load(calibration)
    elif (folder / "calibration.json").is_file():
        cal = Calibration.load(folder / "calibration.json")
    summary = summarize(results, cal)
    summary["seconds_per_scan"] = t_eval / max(len(cases), 1)
    summary["model"] = str(folder)
    return summary


def brain() -> dict[str, dict[str, float]]:
    """Dice (CSF 1, GM 2, WM 3) of demo-brain per geometry frame."""
    sys.path.insert(0, str(REPO / "tests"))
    from medinfer.inference import Predictor
    from test_acceptance_geometry import dice, frames  # type: ignore[import-not-found]

    card, net, _ = _open("demo-brain")
    pred = Predictor(card, net, device="cpu", tta=False)
    out = {}
    for name, (vol, ref) in frames().items():
        lab = pred.predict(vol).label.array[0]
        out[name] = {"CSF": dice(lab, ref, 1), "GM": dice(lab, ref, 2), "WM": dice(lab, ref, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-nodules", help="demo-nodules model (name/folder)")
    ap.add_argument("--compare", default=None, help="another model folder (old column)")
    ap.add_argument("--extra-scans", type=int, default=0,
                    help="more held-out scans generated here (seed 20261131)")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="calibration file (default: the model folder's calibration.json)")
    ap.add_argument("--fit-calibration", type=Path, default=None,
                    help="fit a calibration on the calibration set and write it here")
    ap.add_argument("--calibration-scans", type=int, default=32)
    ap.add_argument("--confidence", default="mean", choices=["mean", "peak"],
                    help="post_processing.confidence of the runs")
    ap.add_argument("--brain", action="store_true", help="also demo-brain on the frames")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # the cropped held-out scans hold no air: the CT-contract warning is expected
    logging.getLogger("medinfer.inference.contract").setLevel(logging.ERROR)
    from medinfer.training.nodules_eval import format_table
    from medinfer.training.nodules_synth import LesionAtlas

    atlas = LesionAtlas.from_file(ATLAS)
    new = nodules(args.model, atlas, args.extra_scans, args.calibration,
                  args.fit_calibration, args.calibration_scans, args.confidence)
    old = None
    if args.compare:
        old = nodules(args.compare, atlas, args.extra_scans, None, None, args.calibration_scans,
                      args.confidence)
    out: dict[str, Any] = {"demo-nodules": new, "compare": old}
    print(f"demo-nodules: {new['scans']} scans, {new['lesions']} lesions "
          f"({new['seconds_per_scan']:.1f} s per scan)")
    print(format_table(old, new, TARGETS) if old else format_table(new, None, TARGETS))
    if args.brain:
        out["demo-brain"] = brain()
        print("\n| frame | CSF | GM | WM |\n|---|---|---|---|")
        for name, d in out["demo-brain"].items():
            print(f"| {name} | {d['CSF']:.3f} | {d['GM']:.3f} | {d['WM']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
