"""A stop (STOP_SIGNAL) sent the moment a child starts, while Python is still starting up: the supervisor starts
children with the signal blocked, so it waits until the child can take it, and the child stops cleanly (exit
0) instead of being killed by the signal's default action. Real child processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from runtime.config import Config
from runtime.processes import STOP_SIGNAL
from runtime.supervisor import Child, Supervisor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("role", ["partition", "gateway"])
def test_a_child_stopped_as_it_starts_exits_cleanly(tmp_path: Path, role: str) -> None:
    supervisor = Supervisor(Config(partitions=1, data_dir=str(tmp_path / "data"), port=free_port()))
    child = Child(role, 0)
    supervisor._start(child)
    assert child.process is not None
    os.kill(child.process.pid, STOP_SIGNAL)
    assert child.process.wait(timeout=60) == 0
