"""The supervisor: start partitions and gateways, restart the ones that die, drain all on SIGTERM.

Shutdown (SIGTERM or SIGINT): gateways drain first -- they stop handing out work and wait, up to
`drain_grace_s`, for the work they handed out to be completed -- while partitions keep running (and
are restarted if they die) so those completions commit. Then partitions close their stores. The
supervisor exits 0 when every child stopped on its own with status 0. A second signal cuts the drain
short.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from runtime import locks
from runtime.config import Config
from runtime.processes import (
    CONFIG_ENV,
    EXIT_CANNOT_RUN,
    STOP_SIGNAL,
    SUPERVISOR_PID_ENV,
    config_to_env,
)

log = logging.getLogger(__name__)

LAYOUT_FILE = "durable-runtime.json"
CLAIM_FILE = "durable-runtime.lock"  # held by the running node's supervisor
EXIT_BAD_CONFIG = 2
EXIT_UNCLEAN_STOP = 1
_POLL_S = 0.1
_STOP_POLL_S = 0.02
_MAX_BACKOFF_S = 5.0
_STEADY_S = 60.0  # a child that ran this long before it died gets the shortest backoff again
_GATEWAY_STOP_MARGIN_S = 5.0  # beyond drain_grace_s, for the gateway to end its streams and exit
_PARTITION_STOP_S = 10.0


class StartupError(Exception):
    """This node cannot start: its data directory or its ports are taken, or the directory has another layout."""


def claim_data_dir(config: Config) -> int:
    """One node per data directory: the claim lasts as long as this supervisor (see runtime/locks.py).

    Without it a second node started on the same directory by mistake would open the same stores and bind
    the same ipc sockets, beside the first one's processes.
    """
    try:
        os.makedirs(config.data_dir, exist_ok=True)
        return locks.claim(os.path.join(config.data_dir, CLAIM_FILE))
    except locks.ClaimHeld as held:
        by = f" (supervisor pid {held.holder})" if held.holder else ""
        raise StartupError(
            f"{config.data_dir} is in use by another durable-runtime node{by}; stop it first,"
            " or give this node its own --data-dir"
        ) from None
    except OSError as exc:
        raise StartupError(f"cannot use {config.data_dir} as the data directory: {exc}") from None


def check_zmq_ports(config: Config) -> None:
    """With the tcp transport, every partition's port must be free: a port already taken could be another
    node's partition, and this node's gateway would then talk to it."""
    if config.zmq_transport != "tcp":
        return
    host = "" if config.zmq_host in ("*", "0.0.0.0") else config.zmq_host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for partition in range(config.partitions):
        port = config.zmq_base_port + partition
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise StartupError(
                        f"cannot bind partition {partition}'s ZeroMQ address {config.zmq_host}:{port}"
                        f" ({exc.strerror or exc}); check --zmq-host"
                    ) from None
                raise StartupError(
                    f"partition {partition}'s ZeroMQ port {config.zmq_host}:{port} is not free ({exc.strerror});"
                    " is another durable-runtime node using it, or one that is still stopping? Give each node on a"
                    " host its own --zmq-base-port"
                ) from None


def check_grpc_port(config: Config) -> None:
    """The gateway's port must be free. Gateways share it with SO_REUSEPORT when there are several, so another
    node's gateways on it would silently take half of the connections, to their own data; and one that
    cannot bind would be restarted for ever."""
    host = config.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds (TIME_WAIT is no conflict)
        try:
            probe.bind((host, config.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {config.host}:{config.port} is taken: is another durable-runtime node (or another"
                    " program) listening there? Give this node another --port"
                ) from None
            raise StartupError(f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); check --host") from None


def check_data_dir(config: Config) -> None:
    """Record the partition count on first start; refuse another count later (no rebalancing yet)."""
    path = os.path.join(config.data_dir, LAYOUT_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                recorded = json.load(f).get("partitions")
        except (OSError, ValueError, AttributeError) as exc:
            raise StartupError(
                f"cannot read {path} ({exc}); it records the data directory's partition count: restore it, or"
                ' write {"partitions": N, "format": 1} with the count the data directory was created with'
            ) from None
        if recorded != config.partitions:
            raise StartupError(
                f"{config.data_dir} was created with {recorded} partitions; refusing to start with"
                f" --partitions {config.partitions} (the partition count of a data directory is fixed)"
            )
        return
    stores = sorted(name for name in os.listdir(config.data_dir) if re.fullmatch(r"partition-\d{3,}", name))
    if stores and stores != [os.path.basename(config.partition_data_dir(p)) for p in range(config.partitions)]:
        # Say, a backup of the partition stores without this file: writing it with another count would make
        # that count stick, and the partitions (which record theirs too) refuse it, one by one.
        raise StartupError(
            f"{path} is missing, and {config.data_dir} holds the stores of {len(stores)} partitions"
            f" ({stores[0]} to {stores[-1]}); refusing to start with --partitions {config.partitions}. Start with"
            " the count it was created with, or restore the file"
        )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"partitions": config.partitions, "format": 1}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_security(config: Config) -> None:
    """Load TLS files, the API token and Curve keys now, so a bad file fails the start with a clear message."""
    from runtime.gateway import security
    from runtime.router import channel

    security.check(config)
    channel.load_curve_keys(config)
    if not _is_loopback(config.host) and not (config.tls_cert_file or config.api_token or config.api_token_file):
        log.warning("the gRPC gateway listens on %s with neither TLS nor an API token: anyone who can reach it"
                    " can run and read orchestrations", config.host)
    if config.zmq_transport == "tcp" and not config.zmq_curve_secret_file and not _is_loopback(config.zmq_host):
        log.warning("ZeroMQ tcp transport on %s without CurveZMQ keys (--zmq-curve-secret-file): partition"
                    " traffic is neither authenticated nor encrypted", config.zmq_host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
        return (mapped or address).is_loopback
    except ValueError:
        return False


@dataclass
class Child:
    role: str  # "partition" or "gateway"
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0  # in a row: a child that ran for _STEADY_S starts over at the shortest backoff
    next_start: float = 0.0
    started_at: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def argv(self) -> list[str]:
        module = "partitions" if self.role == "partition" else "runtime.gateway"
        return [sys.executable, "-m", module, "--index", str(self.index)]


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.partitions = [Child("partition", i) for i in range(config.partitions)]
        self.gateways = [Child("gateway", i) for i in range(config.gateways)]
        self.stopping = False
        self.forced = False
        self.env = dict(os.environ, **{CONFIG_ENV: config_to_env(config), SUPERVISOR_PID_ENV: str(os.getpid())})

    def run(self) -> int:
        try:
            check_security(self.config)
        except ValueError as exc:
            log.error("%s", exc)
            print(f"durable-runtime: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        self.claim = claim_data_dir(self.config)
        check_data_dir(self.config)
        check_zmq_ports(self.config)
        check_grpc_port(self.config)
        os.makedirs(self.config.runtime_dir(), exist_ok=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.partitions + self.gateways:
            self._start(child)
        log.info(
            "durable-runtime serving on %s:%d with %d partitions (data in %s)",
            self.config.host, self.config.port, self.config.partitions, self.config.data_dir,
        )
        code = 0
        while not self.stopping:
            code = self._watch()
            if code:
                break
            time.sleep(_POLL_S)
        clean = self._shutdown()
        if code:
            return code
        return 0 if clean else EXIT_UNCLEAN_STOP

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stopping:
            self.forced = True  # a second signal: stop waiting for the drain
        self.stopping = True

    def _start(self, child: Child) -> None:
        # The child inherits the blocked STOP_SIGNAL and unblocks it once it can take it (become_child).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
        try:
            child.process = subprocess.Popen(child.argv(), env=self.env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def _watch(self) -> int:
        """Restart dead children with backoff; a child that cannot run here stops the node."""
        now = time.monotonic()
        for child in self.partitions + self.gateways:
            process = child.process
            if process is None:
                if now >= child.next_start:
                    self._start(child)
                continue
            code = process.poll()
            if code is None:
                continue
            if code == EXIT_CANNOT_RUN:
                log.error("%s cannot run with this data directory or configuration (see its message); stopping",
                          child.name)
                return EXIT_CANNOT_RUN
            if now - child.started_at >= _STEADY_S:
                child.restarts = 0
            child.restarts += 1
            delay = min(_MAX_BACKOFF_S, 0.05 * 2 ** min(child.restarts, 7))
            log.warning("%s exited with %s; restarting in %.2fs", child.name, code, delay)
            child.process = None
            child.next_start = now + delay
        return 0

    def _shutdown(self) -> bool:
        """Gateways drain first (in-flight completions commit), then partitions close their stores.

        Returns True when every child stopped on its own with exit status 0.
        """
        log.info("durable-runtime stopping: draining gateways (up to %.1fs)", self.config.drain_grace_s)
        clean = self._stop_all(
            self.gateways, self.config.drain_grace_s + _GATEWAY_STOP_MARGIN_S, keep_alive=self.partitions,
            interruptible=True,
        )
        clean = self._stop_all(self.partitions, _PARTITION_STOP_S) and clean
        log.info("durable-runtime stopped%s", "" if clean else " (not cleanly)")
        return clean

    def _stop_all(self, children: list[Child], timeout_s: float, keep_alive: Sequence[Child] = (),
                  interruptible: bool = False) -> bool:
        """Send `children` the stop signal and wait; meanwhile restart any of `keep_alive` that dies.

        Children still running after `timeout_s` (or, if `interruptible`, after a second signal) are killed.
        """
        running = [c for c in children if c.process is not None and c.process.poll() is None]
        for child in running:
            child.process.send_signal(STOP_SIGNAL)
        clean = True
        deadline = time.monotonic() + timeout_s
        waiting = list(running)
        while waiting:
            for child in list(waiting):
                code = child.process.poll()
                if code is None:
                    continue
                waiting.remove(child)
                if code != 0:
                    clean = False
                    log.warning("%s exited with %s while stopping", child.name, code)
            if not waiting:
                break
            if (interruptible and self.forced) or time.monotonic() >= deadline:
                for child in waiting:
                    log.warning("%s (pid %d) did not stop in time; killing it", child.name, child.process.pid)
                    child.process.kill()
                    child.process.wait()
                return False
            self._keep_alive(keep_alive)
            time.sleep(_STOP_POLL_S)
        return clean

    def _keep_alive(self, children: Sequence[Child]) -> None:
        for child in children:
            if child.process is None or child.process.poll() is not None:
                if child.process is not None and child.process.returncode == EXIT_CANNOT_RUN:
                    continue
                log.warning("%s died while gateways drain; restarting it", child.name)
                child.restarts += 1
                self._start(child)
