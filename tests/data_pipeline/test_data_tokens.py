"""Tokenisation into 4 x 16 x 16 patches: hand-computed tokens and coordinates, exact inverse."""

import numpy as np
import pytest

from medinfer.data import TOKEN_LENGTH, detokenize, tokenize
from medinfer.errors import ConfigError


def test_token_count_coordinates_and_values_by_hand():
    vol = np.arange(8 * 32 * 16, dtype=np.float32).reshape(8, 32, 16)
    bg = np.array([[[1], [0]], [[0], [1]]], dtype=np.uint8)  # grid (2, 2, 1)
    tok = tokenize(vol, bg)
    assert tok.tokens.shape == (4, TOKEN_LENGTH) == (4, 1024)
    assert tok.size.tolist() == [2, 2, 1]
    assert tok.coords.tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]]
    assert tok.background.tolist() == [True, False, False, True]
    # token 1 = voxels d 0..3, h 16..31, w 0..15; value = (d * 32 + h) * 16 + w
    t1 = tok.tokens[1].reshape(4, 16, 16)
    assert t1[0, 0, 0] == 16 * 16 and t1[3, 15, 15] == (3 * 32 + 31) * 16 + 15
    # C order inside the token: index = (dd * 16 + hh) * 16 + ww
    assert tok.tokens[2][(2 * 16 + 5) * 16 + 7] == vol[4 + 2, 5, 7]


def test_detokenize_is_exact_including_dropped_background():
    rng = np.random.default_rng(0)
    vol = rng.random((12, 48, 32)).astype(np.float32)
    bg = (rng.random((3, 3, 2)) < 0.4).astype(np.uint8)
    tok = tokenize(vol, bg)
    back = detokenize(tok.tokens, tok.coords, tok.size)
    assert back.dtype == vol.dtype and np.array_equal(back, vol)
    # shuffled token order is fine
    perm = rng.permutation(len(tok))
    assert np.array_equal(detokenize(tok.tokens[perm], tok.coords[perm], tok.size), vol)
    kept = tokenize(vol, bg, drop_background=True)
    assert len(kept) == int((bg == 0).sum()) and not kept.background.any()
    part = detokenize(kept.tokens, kept.coords, kept.size, fill_value=-1.0)
    vox_bg = np.kron(bg, np.ones((4, 16, 16), dtype=np.uint8)).astype(bool)
    assert np.array_equal(part[~vox_bg], vol[~vox_bg]) and np.all(part[vox_bg] == -1.0)


def test_tokenize_rejects_bad_shapes_and_masks():
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        tokenize(np.zeros((4, 16, 20)))
    with pytest.raises(ConfigError, match="does not match the token grid"):
        tokenize(np.zeros((4, 16, 16)), np.zeros((1, 1, 2)))
    with pytest.raises(ConfigError, match="more than once"):
        detokenize(np.zeros((2, 1024)), np.zeros((2, 3), dtype=int), (1, 1, 1))
    with pytest.raises(ConfigError, match="outside the token grid"):
        detokenize(np.zeros((1, 1024)), np.array([[0, 0, 1]]), (1, 1, 1))
