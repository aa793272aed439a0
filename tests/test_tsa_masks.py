"""M-TSA motion query mask (docs/method.md, "M-TSA")."""

import math

import pytest
import torch

from tsa.masks import motion_query_mask, motion_saliency


def _saliency_by_hand(video, patch):
    """D[t, h, w] = sum |Y[t] - Y[t-1]| over the tubelet, written with explicit loops in float64."""
    pt, ph, pw = patch
    batch, frames, _, height, width = video.shape
    grid = (frames // pt, height // ph, width // pw)
    out = torch.zeros(batch, *grid, dtype=torch.float64)
    for b in range(batch):
        for t in range(1, grid[0]):
            for h in range(grid[1]):
                for w in range(grid[2]):
                    now = video[b, t * pt:(t + 1) * pt, :, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
                    before = video[b, (t - 1) * pt:t * pt, :, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
                    out[b, t, h, w] = (now.double() - before.double()).abs().sum()
        if grid[0] > 1:
            out[b, 0] = out[b, 1]
    return out


def test_saliency_matches_hand_computation():
    video = torch.randn(2, 6, 3, 4, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(motion_saliency(video, (2, 2, 3)).double(), _saliency_by_hand(video, (2, 2, 3)))


@pytest.mark.parametrize("top_k, expected", [(0.2, 3), (0.05, 1), (0.5, 8), (1.0, 15), (0.01, 1), (0.1, 2)])
def test_exactly_top_k_per_frame(top_k, expected):
    video = torch.randn(3, 8, 3, 6, 10, generator=torch.Generator().manual_seed(1))  # grid 4 x 3 x 5
    mask = motion_query_mask(video, (2, 2, 2), top_k)
    assert mask.dtype == torch.bool and mask.shape == (3, 4 * 15)
    assert expected == min(15, max(1, math.floor(top_k * 15 + 0.5)))
    assert (mask.view(3, 4, 15).sum(-1) == expected).all()
    scores = motion_saliency(video, (2, 2, 2)).view(3, 4, 15)
    kept = torch.where(mask.view(3, 4, 15), scores, torch.inf).amin(-1)
    dropped = torch.where(mask.view(3, 4, 15), -torch.inf, scores).amax(-1)
    assert (kept >= dropped).all()


def test_picks_the_moving_object():
    """A bright 16 x 16 square jumps one tubelet to the right every 2 frames over a static textured scene."""
    generator = torch.Generator().manual_seed(2)
    background = torch.rand(1, 1, 3, 64, 64, generator=generator) * 0.5 - 0.75
    video = background.repeat(1, 8, 1, 1, 1) + 0.01 * torch.randn(1, 8, 3, 64, 64, generator=generator)
    for frame in range(8):
        column = frame // 2
        video[0, frame, :, 16:32, 16 * column:16 * column + 16] = 1.0
    mask = motion_query_mask(video, (2, 16, 16), top_k=2 / 16).view(4, 4, 4)
    expected = torch.zeros(4, 4, 4, dtype=torch.bool)
    for t in range(1, 4):  # the square leaves column t-1 and enters column t
        expected[t, 1, t - 1] = expected[t, 1, t] = True
    expected[0] = expected[1]
    assert torch.equal(mask, expected)


def test_latents_static_and_single_frame():
    latents = torch.randn(2, 5, 16, 6, 8)
    mask = motion_query_mask(latents, (1, 2, 2), 0.25)
    assert mask.shape == (2, 5 * 12) and (mask.view(2, 5, 12).sum(-1) == 3).all()
    static = torch.ones(1, 4, 3, 8, 8)
    assert motion_saliency(static, (2, 4, 4)).eq(0).all()
    assert (motion_query_mask(static, (2, 4, 4), 0.5).view(2, 4).sum(-1) == 2).all()
    single = motion_saliency(torch.randn(1, 2, 3, 8, 8), (2, 4, 4))
    assert single.shape == (1, 1, 2, 2) and single.eq(0).all()
    assert motion_query_mask(torch.randn(1, 2, 3, 8, 8), (2, 4, 4), 0.2).sum() == 1


@pytest.mark.parametrize("top_k", [0, -0.1, 1.5, True, "0.2"])
def test_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k must be a fraction in"):
        motion_query_mask(torch.zeros(1, 2, 3, 4, 4), (2, 2, 2), top_k)


def test_bad_video_and_patch():
    with pytest.raises(ValueError, match=r"video must be a \(B, T, C, H, W\)"):
        motion_query_mask(torch.zeros(2, 3, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="must be non-empty multiples of patch_size"):
        motion_query_mask(torch.zeros(1, 3, 3, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="patch_size must be three positive ints"):
        motion_query_mask(torch.zeros(1, 2, 3, 4, 4), (2, 2))
