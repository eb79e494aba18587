"""LR schedules: values at hand-computed steps, and the LambdaLR wrapper.

pytest tests/train/test_schedule.py
"""

import pytest
import torch

from zaya_train.train.schedule import ScheduleConfig, build_scheduler, lr_factor

# cos(pi/4) = 0.7071067811865476, cos(3pi/4) = -0.7071067811865476, sqrt(0.5) = 0.7071067811865476,
# sqrt(0.75) = 0.8660254037844386.


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.1),  # warmup (s + 1) / 10
        (4, 0.5),
        (9, 1.0),
        (10, 1.0),  # cosine progress 0
        (35, 0.1 + 0.9 * 0.5 * (1 + 0.7071067811865476)),  # progress 25/100
        (60, 0.55),  # progress 1/2
        (110, 0.1),  # end
        (500, 0.1),  # held after the end
    ],
)
def test_warmup_cosine(step, expected):
    config = ScheduleConfig(name="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(config, step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "shape, step, expected",
    [
        ("linear", 0, 0.1),
        ("linear", 9, 1.0),
        ("linear", 50, 1.0),  # stable
        ("linear", 80, 1.0),  # the decay starts at 100 - 0.2 * 100 = 80 with progress 0
        ("linear", 90, 0.55),  # progress 1/2
        ("linear", 95, 0.1 + 0.9 * 0.25),  # progress 3/4
        ("cosine", 90, 0.55),
        ("cosine", 95, 0.1 + 0.9 * 0.5 * (1 - 0.7071067811865476)),
        ("1-sqrt", 90, 0.1 + 0.9 * (1 - 0.7071067811865476)),
        ("1-sqrt", 95, 0.1 + 0.9 * (1 - 0.8660254037844386)),
        ("1-sqrt", 100, 0.1),
        ("1-sqrt", 150, 0.1),
    ],
)
def test_wsd(shape, step, expected):
    config = ScheduleConfig(
        name="wsd", warmup_steps=10, total_steps=100, min_lr_ratio=0.1, decay_fraction=0.2, decay_shape=shape
    )
    assert lr_factor(config, step) == pytest.approx(expected, abs=1e-12)


def test_constant_and_no_warmup():
    assert [lr_factor(ScheduleConfig(name="constant", warmup_steps=4), s) for s in (0, 3, 1000)] == [
        0.25,
        1.0,
        1.0,
    ]
    assert lr_factor(ScheduleConfig(name="cosine", warmup_steps=0, total_steps=10), 0) == 1.0


def test_lambda_lr_applies_the_factor_of_each_step_to_each_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 2.0}, {"params": [params[1]], "lr": 0.5}])
    scheduler = build_scheduler(
        optimizer,
        ScheduleConfig(
            name="wsd",
            warmup_steps=2,
            total_steps=10,
            decay_fraction=0.5,
            decay_shape="linear",
            min_lr_ratio=0.0,
        ),
    )
    seen = []
    for _ in range(11):
        seen.extend(group["lr"] for group in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
    # warmup 1/2, 1; stable to step 4; linear decay over steps 5..10: 1 - (s - 5) / 5.
    factors = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    assert seen == pytest.approx([lr * f for f in factors for lr in (2.0, 0.5)])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"name": "step"}, "ScheduleConfig.name"),
        ({"warmup_steps": 20, "total_steps": 10}, "ScheduleConfig.warmup_steps"),
        ({"min_lr_ratio": 1.5}, "ScheduleConfig.min_lr_ratio"),
        ({"decay_shape": "exp"}, "ScheduleConfig.decay_shape"),
        ({"total_steps": 0}, "ScheduleConfig.total_steps"),
        (
            {"name": "wsd", "warmup_steps": 90, "total_steps": 100, "decay_fraction": 0.2},
            "ScheduleConfig.decay_fraction",
        ),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ScheduleConfig(**kwargs)
