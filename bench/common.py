"""Shared constants and small helpers for the benchmark harness."""
from __future__ import annotations

import logging
import os
import socket

ORCH_NAME = "bench_chain"
ACT_NAME = "bench_inc"
ORCH_INPUT = 0
CHAIN_LENGTH = 3
EXPECTED_OUTPUT = "3"          # JSON-serialized result of 0 -> 1 -> 2 -> 3

HOST = "127.0.0.1"


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def quiet_logger(name: str, level: int = logging.WARNING) -> logging.Logger:
    """A logger for SDK objects that does not emit per-instance INFO lines."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    if not logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(h)
    logger.propagate = False
    return logger


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_seconds(pgid: int) -> float:
    """user+system CPU seconds of all live processes in process group `pgid` (Linux /proc)."""
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return float("nan")
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        # fields[0]=state, [1]=ppid, [2]=pgrp, ..., [11]=utime, [12]=stime
        try:
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
        except (IndexError, ValueError):
            continue
    return total / _CLK_TCK
