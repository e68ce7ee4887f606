from datetime import timedelta

import pytest

from core.backoff import backoff_delay

BASE, CAP = timedelta(seconds=30), timedelta(hours=1)


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [
        (1, timedelta(seconds=24), timedelta(seconds=36)),
        (3, timedelta(seconds=96), timedelta(seconds=144)),
        (20, timedelta(seconds=2880), timedelta(seconds=4320)),  # capped at an hour, +-20%
    ],
)
def test_delays_double_with_each_attempt_up_to_the_cap_within_the_jitter(attempts, low, high):
    for _ in range(50):
        delay = backoff_delay(attempts, base=BASE, cap=CAP, jitter=(0.8, 1.2))
        assert low <= delay <= high


def test_attempt_zero_waits_the_base():
    delay = backoff_delay(0, base=BASE, cap=CAP, jitter=(1.0, 1.0))
    assert delay == BASE
