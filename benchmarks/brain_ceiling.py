"""Benchmark: the Dice a perfect ``demo-brain`` could reach through the model grid.

The reference labels of each frame of ``tests/test_acceptance_geometry.py`` are one-hot
encoded, brought to the model grid with the engine's own
:func:`medinfer.transforms.to_model_grid` (RAS, isotropic spacing, linear), carried back
with :func:`medinfer.transforms.to_source_grid` (linear, as the ``Predictor`` carries
probabilities) and arg-maxed: the Dice of CSF, GM and WM against the reference is the
ceiling of any model on that grid.

Usage::

    .venv/bin/python benchmarks/brain_ceiling.py [SPACING_MM ...]   # default 1.5 1.25 1.0

Measured (2026-11-30): 1.5 mm GM 0.976-0.990, WM 0.979-0.991, CSF 0.854-0.946;
1.25 mm CSF 0.908-0.950; 1.0 mm CSF 0.977-1.0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(spacings: list[float]) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from medinfer.transforms import to_model_grid, to_source_grid
    from medinfer.volume import Volume
    from test_acceptance_geometry import dice, frames  # type: ignore[import-not-found]

    print("| spacing mm | frame | CSF | GM | WM |\n|---|---|---|---|---|")
    for sp in spacings:
        for name, (vol, ref) in frames().items():
            onehot = np.stack([(ref == k).astype(np.float32) for k in range(4)])
            grid, record = to_model_grid(Volume(onehot, vol.affine, {}), "RAS", (sp,) * 3)
            back = to_source_grid(grid, record, interpolation="linear")
            pred = np.argmax(np.asarray(back.array), axis=0)
            d = [dice(pred, ref, k) for k in (1, 2, 3)]
            print(f"| {sp} | {name} | {d[0]:.3f} | {d[1]:.3f} | {d[2]:.3f} |")


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [1.5, 1.25, 1.0])
