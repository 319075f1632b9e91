"""Rectified flow math, timestep sampling and shifts, samplers, CFG."""

import math

import pytest
import torch

from vidgen.diffusion import (
    cfg_model_fn,
    flow_loss,
    interpolate,
    resolution_shift,
    sample_euler,
    sample_heun,
    sample_timesteps,
    shift_timesteps,
    timesteps_schedule,
    velocity_target,
)
from vidgen.models.dit import build_wan_dit

# --------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------


def test_interpolation_endpoints_and_velocity():
    x0, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.tensor([0.1, 0.5, 0.8])
    assert torch.allclose(interpolate(x0, eps, t)[1], 0.5 * (x0[1] + eps[1]))
    # d x_t / dt is the target, by finite differences
    h = 1e-3
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0, eps), atol=1e-3, rtol=1e-3)
    # per-token times for packed tokens [N, P]
    tokens = interpolate(x0.reshape(6, 4), eps.reshape(6, 4), t.repeat_interleave(2))
    torch.testing.assert_close(tokens.reshape(3, 2, 4), interpolate(x0, eps, t))
    with pytest.raises(ValueError, match="does not match"):
        interpolate(x0, eps, torch.ones(2))


def test_flow_loss_per_sample_mean_then_mean():
    x0 = [torch.randn(2, 1, 2, 2), torch.randn(2, 3, 4, 2)]
    eps = [torch.randn_like(a) for a in x0]
    target = [velocity_target(a, e) for a, e in zip(x0, eps)]
    assert flow_loss(target, x0, eps) == 0
    pred = [t + 1.0 for t in target[:1]] + [t + 2.0 for t in target[1:]]
    # per-sample MSEs are 1 and 4 whatever the sizes: mean 2.5, weighted (1*1 + 0.5*4) / 2 = 1.5
    assert flow_loss(pred, x0, eps).item() == pytest.approx(2.5)
    assert flow_loss(pred, x0, eps, torch.tensor([1.0, 0.5])).item() == pytest.approx(1.5)
    dense = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert flow_loss(*dense).item() == pytest.approx(
        flow_loss(list(dense[0]), list(dense[1]), list(dense[2])).item()
    )
    with pytest.raises(ValueError, match="one per sample"):
        flow_loss(*dense, torch.ones(2))


# --------------------------------------------------------------------------------------
# Timesteps
# --------------------------------------------------------------------------------------


def test_shift_formula_and_properties():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    s = shift_timesteps(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s.diff() > 0).all() and (s[1:-1] > t[1:-1]).all()
    assert shift_timesteps(torch.tensor(0.5), 3.0).item() == pytest.approx(
        0.75
    )  # 3*.5 / (1 + 2*.5)
    # it multiplies the noise-to-signal ratio t / (1 - t) by shift
    mid = t[1:-1]
    torch.testing.assert_close(s[1:-1] / (1 - s[1:-1]), 3.0 * mid / (1 - mid))
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_timesteps(t, 0.0)


def test_resolution_shift_interpolates_between_anchors():
    shifts = resolution_shift([64, 256, 2048, 32760, 100000])
    assert shifts[0].item() == pytest.approx(1.0) and shifts[1].item() == pytest.approx(1.0)
    assert shifts[3].item() == pytest.approx(5.0) and shifts[4].item() == pytest.approx(
        5.0
    )  # clamped
    assert 1.0 < shifts[2].item() < 5.0
    # geometric midpoint in tokens -> geometric midpoint in shift
    mid = math.sqrt(256 * 32760)
    assert resolution_shift(mid).item() == pytest.approx(math.sqrt(5.0), rel=1e-4)
    with pytest.raises(ValueError, match="base_tokens < max_tokens"):
        resolution_shift(100, base_tokens=500, max_tokens=400)


@pytest.mark.parametrize("mode", ["logit_normal", "uniform"])
def test_sample_timesteps(mode):
    t = sample_timesteps(4000, mode=mode, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and (t > 0).all() and (t < 1).all()
    assert t.mean().item() == pytest.approx(0.5, abs=0.03)
    same = sample_timesteps(4000, mode=mode, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, same)
    shifted = sample_timesteps(
        4000, mode=mode, shift=3.0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(shifted, shift_timesteps(t, 3.0))
    base = sample_timesteps(2, mode=mode, generator=torch.Generator().manual_seed(0))
    per_sample = sample_timesteps(
        2, mode=mode, shift=torch.tensor([1.0, 3.0]), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(per_sample, torch.stack([base[0], shift_timesteps(base[1], 3.0)]))


def test_sample_timesteps_errors():
    with pytest.raises(
        ValueError, match="unknown timestep mode 'cosine'; valid: logit_normal, uniform"
    ):
        sample_timesteps(3, mode="cosine")
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        sample_timesteps(3, shift=torch.ones(2))


# --------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------


def test_schedule():
    ts = timesteps_schedule(4)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(timesteps_schedule(4, shift=3.0), shift_timesteps(ts, 3.0))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        timesteps_schedule(0)


def test_euler_is_exact_on_the_straight_flow_of_a_point_mass():
    # For data = a single point x_data, the exact velocity is (x - x_data) / t and the
    # trajectories are straight lines: Euler lands on x_data exactly, whatever the steps.
    x_data = torch.tensor([[1.5, -2.0, 0.25]])

    def model_fn(x, t):
        return (x - x_data) / t[:, None]

    calls = []
    x1 = torch.randn(1, 3)
    out = sample_euler(model_fn, x1, timesteps_schedule(3, shift=2.0), callback=calls.append)
    torch.testing.assert_close(out, x_data, atol=1e-6, rtol=1e-6)
    assert [c["i"] for c in calls] == [0, 1, 2]
    torch.testing.assert_close(calls[0]["x0"], x_data)  # x - t v predicts the data point


def test_heun_is_more_accurate_on_a_curved_ode():
    # dx/dt = x  =>  x(0) = x(1) * exp(-1)
    def model_fn(x, t):
        return x

    x1 = torch.ones(1, 2, dtype=torch.float64)
    exact = x1 * math.exp(-1)
    ts = timesteps_schedule(8).double()
    err_euler = (sample_euler(model_fn, x1, ts) - exact).abs().max().item()
    err_heun = (sample_heun(model_fn, x1, ts) - exact).abs().max().item()
    assert err_heun < err_euler / 10
    # second order: halving the step size divides the error by ~4
    err_heun_16 = (
        (sample_heun(model_fn, x1, timesteps_schedule(16).double()) - exact).abs().max().item()
    )
    assert 3.0 < err_heun / err_heun_16 < 5.0


def test_cfg_wrapper():
    calls = []

    def model_fn(x, t, context):
        calls.append(context)
        return x * 0 + context

    guided = cfg_model_fn(
        model_fn,
        cond={"context": torch.tensor(3.0)},
        uncond={"context": torch.tensor(1.0)},
        scale=4.0,
    )
    out = guided(torch.zeros(2, 1), torch.ones(2))
    torch.testing.assert_close(out, torch.full((2, 1), 1.0 + 4.0 * (3.0 - 1.0)))
    assert len(calls) == 2
    calls.clear()
    no_guidance = cfg_model_fn(
        model_fn,
        cond={"context": torch.tensor(3.0)},
        uncond={"context": torch.tensor(1.0)},
        scale=1.0,
    )
    torch.testing.assert_close(
        no_guidance(torch.zeros(2, 1), torch.ones(2)), torch.full((2, 1), 3.0)
    )
    assert len(calls) == 1


def test_samplers_drive_the_dit_with_cfg():
    torch.manual_seed(0)
    model = build_wan_dit("tiny", in_channels=4, out_channels=4).eval()
    torch.nn.init.normal_(model.proj_out.weight, std=0.05)
    cond, uncond = {"context": torch.randn(1, 4, 32)}, {"context": torch.randn(1, 1, 32)}
    x1 = torch.randn(1, 4, 2, 4, 4)
    for sampler in (sample_euler, sample_heun):
        out = sampler(
            cfg_model_fn(model, cond, uncond, scale=3.0), x1, timesteps_schedule(3, shift=2.0)
        )
        assert out.shape == x1.shape and torch.isfinite(out).all() and not torch.allclose(out, x1)
