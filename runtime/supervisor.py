"""The supervisor: start partitions and gateways, restart the ones that die, drain all on SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from runtime.config import Config
from runtime.processes import CONFIG_ENV, config_to_env

log = logging.getLogger(__name__)

LAYOUT_FILE = "durable-runtime.json"
EXIT_BAD_DATA = 78
_POLL_S = 0.1
_MAX_BACKOFF_S = 5.0


class DataDirError(Exception):
    """The data directory cannot be used with this configuration."""


def check_data_dir(config: Config) -> None:
    """Record the partition count on first start; refuse another count later (no rebalancing yet)."""
    os.makedirs(config.data_dir, exist_ok=True)
    path = os.path.join(config.data_dir, LAYOUT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f).get("partitions")
        if recorded != config.partitions:
            raise DataDirError(
                f"{config.data_dir} was created with {recorded} partitions; refusing to start with"
                f" --partitions {config.partitions} (the partition count of a data directory is fixed)"
            )
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"partitions": config.partitions, "format": 1}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Child:
    role: str  # "partition" or "gateway"
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0

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
        self.env = dict(os.environ, **{CONFIG_ENV: config_to_env(config)})

    def run(self) -> int:
        check_data_dir(self.config)
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
        self._shutdown()
        return code

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv(), env=self.env)
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def _watch(self) -> int:
        """Restart dead children with backoff; a partition that rejects its data stops the node."""
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
            if code == EXIT_BAD_DATA:
                log.error("%s refused its data directory; stopping", child.name)
                return EXIT_BAD_DATA
            child.restarts += 1
            delay = min(_MAX_BACKOFF_S, 0.05 * 2 ** min(child.restarts, 7))
            log.warning("%s exited with %s; restarting in %.2fs", child.name, code, delay)
            child.process = None
            child.next_start = now + delay
        return 0

    def _shutdown(self) -> None:
        """Gateways drain first (in-flight completions commit), then partitions close their stores."""
        grace = self.config.drain_grace_s
        self._stop_all(self.gateways, grace + 2.0)
        self._stop_all(self.partitions, 10.0)
        log.info("durable-runtime stopped")

    def _stop_all(self, children: list[Child], timeout_s: float) -> None:
        running = [c.process for c in children if c.process is not None and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
