"""Helpers shared by the inference tests."""

from __future__ import annotations

from typing import Any

from tiny_models import oblique_lps_affine, tiny_seg_card

__all__ = ["card_dict", "oblique_lps_affine"]


def card_dict(**over: Any) -> dict[str, Any]:
    """model.yaml dict of the tiny 3-label UNet (labels csf, tissue); ``over`` replaces keys."""
    return tiny_seg_card(("csf", "tissue"), **over)
