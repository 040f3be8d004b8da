"""Shared settings for inference tests: one torch thread (tiny nets, shared CPUs)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
