"""Actions: what the core asks the partition process to do once the write transaction has committed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reply:
    """Answer request `request_id` from `to` (a gateway or partition identity)."""

    to: bytes
    request_id: int
    result: Any = None
    error: tuple[str, str] | None = None


@dataclass(frozen=True)
class SendToPartition:
    """Outbox rows for `destination` were written; send them (they are resent until acked)."""

    destination: int


@dataclass(frozen=True)
class AckPartition:
    """Tell partition `sender` that its messages up to `seq` took effect here."""

    sender: int
    seq: int


@dataclass(frozen=True)
class StatusChanged:
    """An instance's status changed; wake the waiters whose condition now holds."""

    instance_id: str


@dataclass(frozen=True)
class WorkAvailable:
    """Ready orchestrations or activities were added; report demand to the gateways."""


@dataclass(frozen=True)
class TimerScheduled:
    """A durable timer row was written; the partition's loop timer may need to fire earlier."""

    fire_ms: int
