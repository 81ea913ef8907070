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
# The supervisor's pid, so a child can tell whether its parent is still the supervisor. Comparing the
# parent pid with 1 instead would kill every child of a supervisor that is itself pid 1 (a container).
SUPERVISOR_PID_ENV = "DURABLE_RUNTIME_SUPERVISOR_PID"

# Children stop only when the supervisor says so, with this signal. SIGTERM and SIGINT sent to the
# whole process group (Ctrl-C, systemd's default kill mode) are the supervisor's to handle: it drains
# the gateways first and stops the partitions after them.
STOP_SIGNAL = signal.SIGUSR1

# A partition or gateway exits with this when it cannot run with the node's data directory or configuration
# (say its address is taken), and restarting it would not help: the supervisor stops the node.
EXIT_CANNOT_RUN = 78


_stop_before_serving = False


def _note_stop(signum: int, frame: object) -> None:
    global _stop_before_serving
    _stop_before_serving = True


def stop_requested() -> bool:
    """Whether STOP_SIGNAL came before serve() took it over: serve() then stops at once, cleanly."""
    return _stop_before_serving


def become_child(on_parent_death: int = STOP_SIGNAL) -> None:
    """Ignore the group's SIGTERM/SIGINT, note an early STOP_SIGNAL, and get `on_parent_death` when the
    supervisor dies.

    The supervisor starts children with STOP_SIGNAL blocked, so one sent while Python starts up waits until
    it is noted here instead of killing the child (an unclean stop). A partition stops cleanly on the
    supervisor's death (STOP_SIGNAL); a gateway is killed: a drain would only hold the port for its grace,
    waiting for partitions that died with the supervisor, and block the node's restart.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, _note_stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {STOP_SIGNAL})
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    die_with_parent(on_parent_death, int(supervisor) if supervisor.isdigit() else None)


def config_to_env(config: Config) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_env() -> Config:
    return Config(**json.loads(os.environ[CONFIG_ENV]))


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """Ask Linux to signal this process when the supervisor (`parent_pid`) dies, so no child outlives it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
        if parent_pid is not None and os.getppid() != parent_pid:  # it died before prctl took effect
            os.kill(os.getpid(), sig)


def run_loop(coro_factory: object) -> None:
    """Run a coroutine on uvloop."""
    import uvloop

    uvloop.run(coro_factory())  # type: ignore[operator]
