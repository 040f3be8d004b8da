"""Sliding-window engine: MONAI equivalence, TTA, whole-volume mode, window plan."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.inferers import sliding_window_inference as monai_swi
from monai.networks.nets import UNet

from medinfer.errors import ConfigError, ModelError
from medinfer.inference import (
    WindowPlan,
    importance_map,
    sliding_window_inference,
    tta_flips,
)

PATCH = (12, 8, 10)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(1)
    return UNet(3, 2, 3, channels=(4, 8), strides=(2,), num_res_units=1).eval()


@pytest.fixture(scope="module")
def conv() -> torch.nn.Module:
    """Position-independent net without striding (any input size works)."""
    torch.manual_seed(2)
    return torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 3, 3, padding=1)
    ).eval()


SHAPES = {
    "larger": (2, 2, 19, 11, 14),
    "smaller": (1, 2, 7, 5, 9),
    "mixed": (1, 2, 30, 6, 10),
}


@pytest.mark.parametrize("blending", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_monai(net: torch.nn.Module, blending: str, overlap: float, shape: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(*SHAPES[shape])
    with torch.no_grad():
        ref = monai_swi(x, PATCH, 2, net, overlap=overlap, mode=blending)
    ours = sliding_window_inference(x, net, PATCH, overlap=overlap, blending=blending,
                                    batch_size=3, device="cpu")
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sigma_scale_and_per_axis_overlap_match_monai(net: torch.nn.Module) -> None:
    x = torch.randn(1, 2, 19, 11, 14)
    with torch.no_grad():
        ref = monai_swi(x, PATCH, 1, net, overlap=(0.5, 0.25, 0.0), mode="gaussian",
                        sigma_scale=0.25)
    ours = sliding_window_inference(x, net, PATCH, overlap=(0.5, 0.25, 0.0),
                                    blending="gaussian", sigma_scale=0.25)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_importance_map_matches_monai() -> None:
    from monai.data.utils import compute_importance_map

    for patch in [(12, 8, 10), (5, 64, 3)]:
        ref = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
        torch.testing.assert_close(importance_map(patch, "gaussian", 0.125), ref)
    assert importance_map((3, 4, 5), "constant").eq(1).all()


def test_batch_size_does_not_change_result(net: torch.nn.Module) -> None:
    x = torch.randn(2, 2, 16, 11, 13)
    a = sliding_window_inference(x, net, PATCH, overlap=0.5, batch_size=1)
    b = sliding_window_inference(x, net, PATCH, overlap=0.5, batch_size=7)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _manual_tta(model: torch.nn.Module, x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for r in range(len(axes) + 1):
            for dims in itertools.combinations(axes, r):
                d = [a + 2 for a in dims]
                xf = torch.flip(x, d) if d else x
                y = model(xf)
                outs.append(torch.flip(y, d) if d else y)
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2)])
def test_tta_whole_volume_is_mean_of_manual_flips(conv: torch.nn.Module,
                                                  axes: tuple[int, ...]) -> None:
    x = torch.randn(1, 2, 9, 7, 6)
    ours = sliding_window_inference(x, conv, (4, 4, 4), mode="whole_volume", tta_axes=axes)
    torch.testing.assert_close(ours, _manual_tta(conv, x, axes), atol=1e-5, rtol=0)
    plain = sliding_window_inference(x, conv, (4, 4, 4), mode="whole_volume")
    assert (ours - plain).abs().max() > 1e-4  # the flips did something


def test_tta_sliding_is_windowwise_mean_of_flips(net: torch.nn.Module) -> None:
    x = torch.randn(1, 2, 20, 13, 17)
    axes = (0, 2)
    ours = sliding_window_inference(x, net, PATCH, overlap=0.25, tta_axes=axes)
    with torch.no_grad():
        ref = monai_swi(x, PATCH, 1, lambda w: _manual_tta(net, w, axes), overlap=0.25,
                        mode="gaussian")
    assert (ours - ref).abs().max().item() <= 1e-4
    assert len(tta_flips((0, 1, 2))) == 8 and tta_flips(None) == [()]


def test_whole_volume_pads_to_divisible_and_crops(net: torch.nn.Module) -> None:
    x = torch.randn(2, 2, 13, 9, 11)
    seen: list[tuple[int, ...]] = []

    def spy(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return net(t)

    out = sliding_window_inference(x, spy, (4, 4, 4), mode="whole_volume", size_divisible=4,
                                   batch_size=2)
    assert seen == [(2, 2, 16, 12, 12)]
    assert out.shape == (2, 3, 13, 9, 11)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 1, 1, 2, 1, 2))
        ref = net(padded)[:, :, 1:14, 1:10, 0:11]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_progress_monotonic_and_complete(net: torch.nn.Module) -> None:
    seen: list[float] = []
    sliding_window_inference(torch.randn(1, 2, 20, 10, 12), net, PATCH, overlap=0.5,
                             batch_size=2, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and all(0 < f <= 1 for f in seen)


def test_window_plan_order_and_slabs() -> None:
    plan = WindowPlan.build((40, 20, 10), (16, 8, 10), (0.5, 0.25, 0.0))
    assert plan.starts == ((0, 8, 16, 24), (0, 6, 12), (0,))
    wins = list(plan.windows())
    assert len(wins) == len(plan) == 12
    assert [w[0] for w in wins] == sorted(w[0] for w in wins)  # axis 0 slowest
    assert plan.final_before(1) == 8 and plan.final_before(4) == 40
    # after r rows, no later window starts before final_before(r)
    for r in range(1, 4):
        later = [w for w in wins if w[0] >= plan.starts[0][r]]
        assert min(w[0] for w in later) >= plan.final_before(r)


def test_invalid_options(net: torch.nn.Module) -> None:
    x = torch.randn(1, 2, 8, 8, 8)
    with pytest.raises(ConfigError, match="overlap"):
        sliding_window_inference(x, net, PATCH, overlap=1.0)
    with pytest.raises(ConfigError, match="'gaussian', 'constant'"):
        sliding_window_inference(x, net, PATCH, blending="cosine")
    with pytest.raises(ConfigError, match="patch_size"):
        sliding_window_inference(x, net, (8, 8))
    with pytest.raises(ConfigError, match="tta_axes"):
        sliding_window_inference(x, net, PATCH, tta_axes=(3,))
    with pytest.raises(ModelError, match="model output shape"):
        sliding_window_inference(x, lambda t: t[:, :, ::2], PATCH)


@pytest.mark.parametrize("shape", [(2, 2, 23, 9, 12), (1, 2, 7, 5, 9)])
def test_slabs_are_final_when_reported(net: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """on_slab reports contiguous axis-0 slabs whose values no later window changes."""
    x = torch.randn(*shape)
    snaps: list[tuple[int, int, int, torch.Tensor]] = []

    def on_slab(i: int, lo: int, hi: int, slab: torch.Tensor) -> None:
        snaps.append((i, lo, hi, slab.clone()))

    out = sliding_window_inference(x, net, PATCH, overlap=0.5, batch_size=2, on_slab=on_slab)
    for i in range(shape[0]):
        mine = [(lo, hi, v) for j, lo, hi, v in snaps if j == i]
        assert mine[0][0] == 0 and mine[-1][1] == shape[2]
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:], strict=False))
        for lo, hi, v in mine:
            assert torch.equal(v, out[i, :, lo:hi])
    assert [s[0] for s in snaps] == sorted(s[0] for s in snaps)
    if shape[2] > PATCH[0]:
        assert len(snaps) > shape[0]  # really several slabs per image
