"""The supervisor's restart backoff: it grows while a child keeps dying, and starts over once a child has run
for a while. Real child processes (a Python that exits at once), no partition is started."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from runtime.config import Config
from runtime.supervisor import _MAX_BACKOFF_S, _STEADY_S, Child, Supervisor

ROUNDING = 1e-6  # next_start - clock is the backoff only up to float rounding


def watch_a_death(ran_for_s: float, restarts_before: int) -> tuple[Child, tuple[float, float]]:
    """One child that exited with status 3 after `ran_for_s`, seen by one _watch(); and the backoff it got."""
    supervisor = Supervisor(Config(partitions=1))
    child = Child("partition", 0, restarts=restarts_before)
    supervisor.partitions, supervisor.gateways = [child], []
    child.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.process.wait(timeout=30)
    child.started_at = time.monotonic() - ran_for_s
    before = time.monotonic()
    assert supervisor._watch() == 0
    after = time.monotonic()
    assert child.process is None  # nothing is started until next_start
    # _watch() read its clock between `before` and `after`: the backoff is bracketed without assuming any speed.
    return child, (child.next_start - after, child.next_start - before)


@pytest.mark.parametrize("restarts_before", [0, 6])
def test_a_child_that_keeps_dying_backs_off_up_to_the_cap(restarts_before: int) -> None:
    child, (low, high) = watch_a_death(ran_for_s=0.0, restarts_before=restarts_before)
    assert child.restarts == restarts_before + 1
    assert low - ROUNDING <= min(_MAX_BACKOFF_S, 0.05 * 2 ** (restarts_before + 1)) <= high + ROUNDING


def test_a_child_that_ran_steadily_gets_the_shortest_backoff_again() -> None:
    child, (low, high) = watch_a_death(ran_for_s=_STEADY_S + 1, restarts_before=6)
    assert child.restarts == 1
    assert low - ROUNDING <= 0.1 <= high + ROUNDING
