"""Learning-rate schedules (vidgen/utils/schedule.py): warm-up, then constant / cosine / linear."""

import math

import pytest
import torch

from vidgen.utils.optim import optim_options
from vidgen.utils.schedule import lr_lambda, optim_lr_lambda, trainer_max_steps


def test_warmup_then_constant():
    f = lr_lambda(warmup_steps=4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_lambda()(0) == 1.0  # no warm-up: full lr from the first step


def test_cosine_and_linear_decay():
    cos = lr_lambda(warmup_steps=10, decay="cosine", decay_steps=110, min_lr_ratio=0.1)
    assert cos(9) == 1.0
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi / 2) = 0
    assert cos(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = lr_lambda(warmup_steps=0, decay="linear", decay_steps=100)
    assert [lin(s) for s in (0, 25, 50, 100, 200)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])


def test_decay_defaults_to_max_steps_and_drives_lambda_lr():
    f = optim_lr_lambda(optim_options({"lr": 1.0, "warmup_steps": 0, "decay": "linear"}), max_steps=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    # a resumed scheduler continues from its saved step, not from step 0
    def fresh():
        return torch.optim.lr_scheduler.LambdaLR(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), f)

    saved = fresh()
    for _ in range(2):
        saved.optimizer.step()
        saved.step()
    resumed = fresh()
    resumed.load_state_dict(saved.state_dict())
    resumed.optimizer.step()
    resumed.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)

def test_trainer_max_steps():
    class Module:
        _trainer = None

    m = Module()
    assert trainer_max_steps(m) is None
    m._trainer = type("T", (), {"max_steps": -1})()
    assert trainer_max_steps(m) is None
    m._trainer.max_steps = 300
    assert trainer_max_steps(m) == 300


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": "step"}, "optim.decay='step'; choose from"),
        ({"decay": "cosine"}, "needs decay_steps"),
        ({"decay": "cosine", "warmup_steps": 100, "decay_steps": 50}, "warmup_steps=100, got 50"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio=1.5"),
        ({"warmup_steps": -1}, "warmup_steps=-1"),
    ],
)
def test_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_lambda(**kwargs)
