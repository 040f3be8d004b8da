"""Streaming slab accumulation equals the full-volume path (random many-class models)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import oblique_lps_affine

from medinfer.errors import ModelError
from medinfer.inference import Predictor, sliding_window_inference
from medinfer.inference.streaming import make_tta_runner, predict_streaming, stream_logits
from medinfer.models import ModelCard
from medinfer.volume import Volume


def random_net(k: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.LeakyReLU(),
        torch.nn.Conv3d(8, k, 3, padding=1),
    ).eval()


def make_card(k: int, **inference: Any) -> ModelCard:
    inf = {"patch_size": [16, 12, 20], "overlap": 0.5, "blending": "gaussian"}
    inf.update(inference)
    return ModelCard.from_dict({
        "name": "random", "version": "0",
        "labels": {i: {"name": f"c{i}"} for i in range(k)},
        "input": {"orientation": "PIR", "spacing": [1.3, 0.9, 1.7],
                  "normalization": {"method": "zscore"}},
        "inference": inf,
        "weights": {"format": "torchscript", "file": "unused.ts"},
    })


def scan(shape: tuple[int, int, int] = (30, 26, 13), seed: int = 1) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.normal(size=shape).astype(np.float32)
    return Volume(arr, oblique_lps_affine((0.9, 1.1, 2.5)), {})


@pytest.mark.parametrize(("k", "tta", "overlap"), [(50, False, 0.5), (50, True, 0.25),
                                                   (7, False, 0.0)])
def test_streamed_labels_equal_full_volume(k: int, tta: bool, overlap: float) -> None:
    card = make_card(k)
    net = random_net(k)
    vol = scan()
    pred = Predictor(card, net, device="cpu", tta=tta, overlap=overlap)
    full = pred.predict(vol)
    streamed = predict_streaming(pred, vol)
    assert streamed.label.shape == full.label.shape == (1, 30, 26, 13)
    assert np.array_equal(streamed.label.affine, vol.affine)
    assert streamed.label.array.dtype == full.label.array.dtype
    n_diff = int(np.sum(streamed.label.array != full.label.array))
    assert n_diff == 0, f"{n_diff} voxels differ"
    assert len(np.unique(full.label.array)) > 3  # the comparison is not trivial
    assert [s.voxels for s in streamed.statistics] == [s.voxels for s in full.statistics]


def test_streamed_probabilities_equal_full_volume() -> None:
    card = make_card(5)
    pred = Predictor(card, random_net(5, seed=3), device="cpu", save_probabilities=True)
    vol = scan((21, 17, 9), seed=4)  # smaller than the patch along axis 2: padding
    full = pred.predict(vol)
    streamed = predict_streaming(pred, vol)
    assert streamed.probabilities is not None and full.probabilities is not None
    np.testing.assert_array_equal(streamed.probabilities.array, full.probabilities.array)
    assert np.array_equal(streamed.label.array, full.label.array)


def test_stream_logits_rows_match_engine_and_float16_error_small() -> None:
    torch.manual_seed(0)
    net = random_net(50, seed=5)
    x = torch.randn(1, 1, 40, 24, 24)
    patch = (16, 16, 16)
    ref = sliding_window_inference(x, net, patch, overlap=0.5, device="cpu")
    from medinfer.inference.sliding_window import WindowPlan, importance_map

    plan = WindowPlan.build((40, 24, 24), patch, (0.5,) * 3)
    w = importance_map(patch)
    got: dict[str, list[torch.Tensor]] = {"32": [], "16": []}
    rows: list[tuple[int, int]] = []

    def sink(key: str) -> Any:
        def f(t: torch.Tensor, r0: int, r1: int) -> None:
            got[key].append(t.clone())
            if key == "32":
                rows.append((r0, r1))
        return f

    run = make_tta_runner(net, [()])
    stream_logits(x[0], run, patch, plan.starts, w, sink("32"))
    stream_logits(x[0], run, patch, plan.starts, w, sink("16"),
                  accumulate_dtype=torch.float16)
    # rows come in order, cover axis 0 once, and are released before the end
    assert rows[0][0] == 0 and rows[-1][1] == 40 and len(rows) > 1
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    full32 = torch.cat(got["32"], dim=1)
    assert torch.equal(full32, ref[0])  # bitwise identical to the full-volume engine
    full16 = torch.cat(got["16"], dim=1)
    err = float((full16 - ref[0]).abs().max())
    assert 0 < err < 2e-2, err  # float16 accumulation: small, non-zero difference


def test_wrong_output_shape_is_a_model_error() -> None:
    def bad(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :-1]

    with pytest.raises(ModelError, match="does not match the window"):
        stream_logits(torch.zeros(1, 20, 8, 8), make_tta_runner(bad, [()]), (8, 8, 8),
                      [[0, 12], [0], [0]], torch.ones(8, 8, 8), lambda *a: None)


def test_row_by_row_pieces_give_the_same_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    import medinfer.inference.streaming as st

    card = make_card(50)
    pred = Predictor(card, random_net(50, seed=11), device="cpu", tta=False)
    vol = scan((33, 20, 14), seed=12)
    full = pred.predict(vol)
    monkeypatch.setattr(st, "_SINK_BYTES", 1)  # one model row / one output row at a time
    streamed = predict_streaming(pred, vol)
    assert np.array_equal(streamed.label.array, full.label.array)
