"""Weight EMA and the NaN/Inf guard."""

import copy
import math

import pytest
import torch
from torch import nn

from vidgen.utils import EMA, NonFiniteGuard, grads_finite
from vidgen.utils.ema import ValidateWithEMA


class OneParam(nn.Module):
    def __init__(self, value: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))
        self.register_buffer("count", torch.tensor(0))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


def set_w(model: OneParam, value: float) -> None:
    with torch.no_grad():
        model.w.fill_(value)


# ---------------------------------------------------------------- EMA math


def test_ema_math_on_one_parameter():
    model = OneParam(0.0)
    ema = EMA(model, decay=0.9)
    set_w(model, 1.0)
    assert ema.update(model, step=0) == pytest.approx(0.9)
    assert ema.shadow["w"].item() == pytest.approx(0.1)  # 0.9 * 0 + 0.1 * 1
    set_w(model, 2.0)
    ema.update(model, step=1)
    assert ema.shadow["w"].item() == pytest.approx(0.9 * 0.1 + 0.1 * 2.0)
    assert ema.num_updates == 2 and ema.last_step == 1


def test_ema_shadow_is_fp32_and_buffers_copied():
    model = OneParam(0.0).to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert ema.shadow["w"].dtype == torch.float32
    assert "cache" not in ema.buffers  # non-persistent buffers are not tracked
    model.count += 3
    ema.update(model, step=0)
    assert ema.buffers["count"].item() == 3


def test_ema_warmup_rule_and_update_every():
    model = OneParam()
    ema = EMA(model, decay=0.99, warmup_steps=10)
    assert ema.decay_at(0) == 0.0  # first update copies the weights
    # horizon at step 5: 1 + (100 - 1) * 0.5 = 50.5 -> d = 1 - 1/50.5
    assert ema.decay_at(5) == pytest.approx(1 - 1 / 50.5)
    assert ema.decay_at(10) == pytest.approx(0.99) and ema.decay_at(10_000) == pytest.approx(0.99)
    decays = [ema.decay_at(s) for s in range(12)]
    assert decays == sorted(decays)  # ramps up monotonically

    set_w(model, 5.0)
    ema.update(model, step=0)
    assert ema.shadow["w"].item() == 5.0  # d = 0 during the first step

    sparse = EMA(model, decay=0.9, update_every=4)
    assert sparse.update(model, step=3) is None  # skipped
    assert sparse.update(model, step=4) == pytest.approx(0.9**4)  # same horizon in steps


def test_ema_skips_frozen_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.5)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    frozen = model[0].weight.detach().clone()
    with ema.swap_into(model):
        assert torch.equal(model[0].weight, frozen)  # untouched: frozen weights are their own EMA


# ---------------------------------------------------------------- checkpoint


def test_ema_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.95, warmup_steps=4)
    for step in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model, step)
    saved = copy.deepcopy(ema.state_dict())

    resumed = EMA(nn.Linear(3, 2), decay=0.95, warmup_steps=4)
    resumed.load_state_dict(saved)
    assert resumed.num_updates == 3 and resumed.last_step == 2
    for step in range(3, 8):  # both continue from the same model weights
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model, step)
        resumed.update(model, step)
    for name in ema.shadow:
        assert torch.equal(ema.shadow[name], resumed.shadow[name])

    with pytest.raises(KeyError, match="mismatch"):
        EMA(nn.Linear(3, 2, bias=False)).load_state_dict(saved)


# ---------------------------------------------------------------- swap / copy


def test_swap_into_restores_weights_also_after_exception():
    model = OneParam(1.0)
    ema = EMA(model, decay=0.5)
    set_w(model, 3.0)
    ema.update(model, step=0)  # shadow = 2.0
    with ema.swap_into(model) as swapped:
        assert swapped is model and model.w.item() == 2.0
    assert model.w.item() == 3.0

    with pytest.raises(ZeroDivisionError):
        with ema.swap_into(model):
            assert model.w.item() == 2.0
            _ = 1 / 0
    assert model.w.item() == 3.0
    assert model.w.requires_grad


class _Validated(ValidateWithEMA):
    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def ema_model(self):
        return self.model


def test_validate_with_ema_swaps_for_the_validation_epoch_only():
    model = OneParam(1.0)
    ema = EMA(model, decay=0.5)
    set_w(model, 3.0)
    ema.update(model, step=0)  # shadow = 2.0
    module = _Validated(model, ema)
    module.on_validation_epoch_start()
    assert model.w.item() == 2.0
    module.on_validation_epoch_end()
    assert model.w.item() == 3.0
    module.on_validation_epoch_end()  # a second end is harmless
    assert model.w.item() == 3.0

    plain = _Validated(model, None)  # no EMA: nothing is swapped
    plain.on_validation_epoch_start()
    assert model.w.item() == 3.0
    plain.on_validation_epoch_end()


def test_copy_to_overwrites_model():
    model = OneParam(1.0)
    ema = EMA(model, decay=0.5)
    set_w(model, 5.0)
    ema.update(model, step=0)
    ema.copy_to(model)
    assert model.w.item() == 3.0


# ---------------------------------------------------------------- guard


def test_guard_counts_resets_and_raises():
    guard = NonFiniteGuard(max_consecutive=2, knob="train.max_nonfinite")
    nan, inf, ok = torch.tensor(float("nan")), torch.tensor([1.0, math.inf]), torch.tensor(0.5)
    assert guard.check(ok, "g_loss")
    assert not guard.check(nan, "g_loss")
    assert not guard.check(inf, "g_loss")
    assert guard.consecutive["g_loss"] == 2
    assert guard.check(ok, "g_loss")  # a finite value resets the streak
    assert guard.consecutive["g_loss"] == 0 and guard.total_nonfinite == 2
    assert not guard.check(nan, "d_loss")  # streaks are per loss name
    assert guard.check(ok, "g_loss") and guard.consecutive["d_loss"] == 1

    assert not guard.check(nan, "d_loss")
    with pytest.raises(RuntimeError) as err:
        guard.check(nan, "d_loss", step=1234)
    msg = str(err.value)
    assert "'d_loss'" in msg and "1234" in msg and "3 consecutive" in msg
    assert "train.max_nonfinite=2" in msg


def test_guard_zero_tolerance_and_state_dict():
    strict = NonFiniteGuard(max_consecutive=0)
    with pytest.raises(RuntimeError, match="'loss'"):
        strict.check(torch.tensor(float("nan")))

    guard = NonFiniteGuard(max_consecutive=2)
    guard.check(torch.tensor(1.0), "loss")
    guard.check(torch.tensor(float("nan")), "loss")
    resumed = NonFiniteGuard(max_consecutive=2)
    resumed.load_state_dict(copy.deepcopy(guard.state_dict()))
    assert resumed.state_dict() == guard.state_dict()
    assert not resumed.check(torch.tensor(float("nan")), "loss")  # streak continues at 2
    with pytest.raises(RuntimeError):
        resumed.check(torch.tensor(float("nan")), "loss")


def test_grads_finite():
    model = nn.Linear(2, 1)
    assert grads_finite(model)  # no grads yet
    model(torch.ones(1, 2)).sum().backward()
    assert grads_finite(model)
    model.bias.grad[0] = float("nan")
    assert not grads_finite(model)
