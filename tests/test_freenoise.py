"""FreeNoise's pure pieces: windows and their weights, noise rescheduling, prompt travel's per-frame rule.

The numbers are the official ones (AILab-CVC/FreeNoise): windows of 16 every 4 frames, triangle
weights, in-order block permutations, the two-prompt 3/8 rule and DDIM steps 5..15 of 50.
"""
from __future__ import annotations

import pytest
import torch

from vc_model.freenoise import (per_frame_step, reschedule_noise, travel_embeddings, travel_segments,
                                triangle_weights, window_plan, window_starts, windowed_attention)


def test_triangle_weights_are_the_official_sequences():
    assert triangle_weights(16) == [1, 2, 3, 4, 5, 6, 7, 8, 8, 7, 6, 5, 4, 3, 2, 1]
    assert triangle_weights(5) == [1, 2, 3, 2, 1]
    assert triangle_weights(2) == [1, 1]
    assert triangle_weights(1) == [1]


def test_window_starts_official_frame_counts():
    assert window_starts(64) == list(range(0, 49, 4))  # 13 windows, the last one [48, 64)
    assert len(window_starts(64)) == 13
    assert window_starts(16) == [0]
    assert window_starts(20) == [0, 4]


@pytest.mark.parametrize("frames", [17, 18, 23, 30, 61])
def test_window_starts_add_a_last_window_ending_at_the_last_frame(frames):
    starts = window_starts(frames)
    assert starts[-1] == frames - 16
    assert all(b - a <= 4 for a, b in zip(starts, starts[1:]))
    assert starts[:-1] == list(range(0, frames - 16, 4))


@pytest.mark.parametrize("frames,window,stride", [(64, 16, 4), (17, 16, 4), (30, 16, 4), (11, 4, 2),
                                                  (12, 5, 3), (40, 16, 16), (9, 3, 1)])
def test_every_frame_is_covered_and_the_weights_sum_to_one(frames, window, stride):
    plan = window_plan(frames, window, stride)
    coverage = torch.zeros(frames)
    total = torch.zeros(frames)
    raw = torch.zeros(frames)
    for start, weight in zip(plan.starts, plan.weights):
        coverage[start:start + window] += 1
        total[start:start + window] += weight
        raw[start:start + window] += torch.tensor(triangle_weights(window), dtype=torch.float32)
    assert (coverage >= 1).all()
    torch.testing.assert_close(total, torch.ones(frames))
    # each weight is the triangle value over the frame's summed triangle values (value / count)
    for start, weight in zip(plan.starts, plan.weights):
        expected = torch.tensor(triangle_weights(window), dtype=torch.float32) / raw[start:start + window]
        torch.testing.assert_close(weight, expected)


def test_short_clips_have_no_windows():
    assert window_plan(16) is None and window_plan(5) is None


def test_bad_window_settings_are_refused():
    for window, stride in [(0, 4), (16, 0), (4, 8), (16.0, 4)]:
        with pytest.raises(ValueError, match="temporal"):
            window_starts(32, window, stride)


def _attend(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_windowed_attention_fuses_windows_like_value_over_count():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 23, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = windowed_attention(_attend, q, k, v, window=8, stride=3)
    value, count = torch.zeros_like(q), torch.zeros(23, 1, dtype=torch.float64)
    for s in [0, 3, 6, 9, 12, 15]:  # 15 = 23 - 8, the extra last window
        w = torch.tensor(triangle_weights(8), dtype=torch.float64)[:, None]
        value[..., s:s + 8, :] += _attend(q[..., s:s + 8, :], k[..., s:s + 8, :], v[..., s:s + 8, :]) * w
        count[s:s + 8] += w
    torch.testing.assert_close(out, value / count)


def test_windowed_attention_without_windows_is_plain_attention():
    q, k, v = (torch.randn(2, 16, 4) for _ in range(3))
    assert torch.equal(windowed_attention(_attend, q, k, v, window=16), _attend(q, k, v))
    assert torch.equal(windowed_attention(_attend, q, k, v, window=None), _attend(q, k, v))


# ---- noise rescheduling --------------------------------------------------------------------------


def _frames_as_rows(noise):
    return noise.movedim(2, 0).reshape(noise.shape[2], -1)


@pytest.mark.parametrize("frames,window,stride", [(64, 16, 4), (30, 16, 4), (17, 16, 4), (13, 4, 3), (16, 16, 4)])
def test_rescheduled_noise_keeps_the_first_window_and_permutes_later_blocks(frames, window, stride):
    noise = torch.randn(2, 4, frames, 3, 5, generator=torch.Generator().manual_seed(1))
    out = reschedule_noise(noise, window, stride, generator=torch.Generator().manual_seed(2))
    assert out.shape == noise.shape
    assert torch.equal(out[:, :, :window], noise[:, :, :window])
    rows = _frames_as_rows(out)
    for i in range(window, frames, stride):
        n = min(stride, frames - i)
        block = rows[i:i + n]
        earlier = rows[i - window:i - window + n]
        # every frame of the block is one frame of the block `window` frames earlier, each used once
        matches = (block[:, None] == earlier[None]).all(-1)
        assert (matches.sum(1) == 1).all() and (matches.sum(0) == 1).all()
    # so every frame repeats one of the first `window` frames
    first = _frames_as_rows(noise)[:window]
    assert ((rows[:, None] == first[None]).all(-1).sum(1) == 1).all()


def test_rescheduling_is_seeded_and_shuffles():
    noise = torch.randn(1, 4, 64, 2, 2, generator=torch.Generator().manual_seed(3))
    a = reschedule_noise(noise, generator=torch.Generator().manual_seed(5))
    b = reschedule_noise(noise, generator=torch.Generator().manual_seed(5))
    c = reschedule_noise(noise, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # not a plain repeat of the first window: some block is really permuted
    assert not torch.equal(a[:, :, 16:64], noise[:, :, 0:16].repeat(1, 1, 3, 1, 1))


def test_rescheduling_refuses_a_latent_without_frames():
    with pytest.raises(ValueError, match="frames"):
        reschedule_noise(torch.zeros(1, 4, 8, 8))


# ---- prompt travel --------------------------------------------------------------------------------


def test_two_prompts_follow_the_official_three_eighths_rule():
    assert travel_segments(64, 2) == [(0, 0, 24), (0, 1, 16), (1, 1, 24)]
    emb = torch.randn(2, 3, 5, dtype=torch.float64)
    rows = travel_embeddings(emb, 64)
    assert rows.shape == (64, 3, 5)
    assert torch.equal(rows[:24], emb[0].expand(24, 3, 5))
    assert torch.equal(rows[40:], emb[1].expand(24, 3, 5))
    ramp = rows[24:40]
    torch.testing.assert_close(ramp[0], emb[0])
    torch.testing.assert_close(ramp[-1], emb[1])
    # linear: the official (b - a) / (n - 1) * j steps
    for j in range(16):
        torch.testing.assert_close(ramp[j], emb[0] + (emb[1] - emb[0]) / 15 * j)


@pytest.mark.parametrize("frames,prompts", [(64, 3), (64, 4), (17, 3), (5, 5), (48, 2), (7, 2), (3, 2)])
def test_k_prompts_are_consecutive_segments_that_fill_the_frames(frames, prompts):
    segments = travel_segments(frames, prompts)
    assert sum(n for _, _, n in segments) == frames
    order = [(a, b) for a, b, _ in segments]
    assert order == sorted(order)  # prompts in order, each ramp between neighbours
    assert all(b - a in (0, 1) for a, b in order)
    holds = [n for a, b, n in segments if a == b]
    assert len(set(holds)) <= 1  # every hold equally long
    emb = torch.randn(prompts, 2, 3)
    rows = travel_embeddings(emb, frames)
    assert rows.shape == (frames, 2, 3)
    assert torch.isfinite(rows).all()


def test_one_prompt_is_every_frame_and_too_few_frames_are_refused():
    emb = torch.randn(1, 2, 3)
    assert torch.equal(travel_embeddings(emb, 10), emb.expand(10, 2, 3))
    with pytest.raises(ValueError, match="at least 3 frames"):
        travel_segments(2, 3)


def test_per_frame_steps_are_5_to_15_of_50():
    assert [i for i in range(50) if per_frame_step(i, 50)] == list(range(5, 16))
    assert [i for i in range(25) if per_frame_step(i, 25)] == [3, 4, 5, 6, 7]
