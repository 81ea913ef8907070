"""Entry-point plumbing shared by gateway and partition processes: config hand-off and parent death."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import sys

from runtime.config import Config

CONFIG_ENV = "DURABLE_RUNTIME_CONFIG_JSON"

# Children stop only when the supervisor says so, with this signal. SIGTERM and SIGINT sent to the
# whole process group (Ctrl-C, systemd's default kill mode) are the supervisor's to handle: it drains
# the gateways first and stops the partitions after them.
STOP_SIGNAL = signal.SIGUSR1

# A partition exits with this when it cannot run with the node's data directory or configuration, and
# restarting it would not help: the supervisor stops the node.
EXIT_PARTITION_CANNOT_RUN = 78


def become_child() -> None:
    """Ignore the group's SIGTERM/SIGINT and stop (via STOP_SIGNAL) when the supervisor dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(STOP_SIGNAL)


def config_to_env(config: Config) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_env() -> Config:
    return Config(**json.loads(os.environ[CONFIG_ENV]))


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal this process when the supervisor dies, so no child outlives it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)


def run_loop(coro_factory: object) -> None:
    """Run a coroutine on uvloop."""
    import uvloop

    uvloop.run(coro_factory())  # type: ignore[operator]
