"""A partition process: receive commands over ZeroMQ, apply them in one LMDB transaction, then act.

The loop is the group commit: everything that arrived while the previous batch was committing is
applied in the next write transaction, committed once (fsync), and only then answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import lmdb
import zmq

from partitions import dispatch
from partitions.outbox import Outbox
from partitions.state_machine import actions as act
from partitions.state_machine import apply
from partitions.state_machine.queries import condition_met, instance_state
from partitions.state_machine.state import CoreState, Waiter
from partitions.store import keys
from partitions.store.lmdb_store import LmdbStore, StoreTxn
from partitions.store.upgrade import bring_up_to_date
from runtime import locks
from runtime.config import Config
from runtime.errors import DurableRuntimeError
from runtime.processes import STOP_SIGNAL, stop_requested
from runtime.router.channel import Message, ZmqChannel

log = logging.getLogger(__name__)

_BATCH_HEADROOM_BYTES = 256 << 20
_FORGOTTEN_KEPT_MS = 24 * 3600 * 1000  # a gateway silent for longer than this is gone for good
# A failure in these cannot have touched in-memory state, so it is answered without a restart.
READ_ONLY_COMMANDS = frozenset(
    {"get", "get_children", "get_entity", "history", "list_ids", "query", "query_entities", "wait"}
)


def now_ms() -> int:
    return int(time.time() * 1000)


class PartitionDataError(Exception):
    """The data directory belongs to another partition layout."""


class PartitionBusyError(Exception):
    """Another process has this partition's store open."""


class PartitionEndpointError(Exception):
    """The partition cannot bind its ZeroMQ endpoint: another process may have it, so the node must not go on."""


def claim_store(config: Config, partition: int) -> int:
    """One process per partition store, whatever the supervisors think (see runtime/locks.py)."""
    path = config.partition_data_dir(partition)
    try:
        os.makedirs(path, exist_ok=True)
        return locks.claim(os.path.join(path, "partition.lock"))
    except locks.ClaimHeld as held:
        by = f"pid {held.holder}" if held.holder else "another process"
        raise PartitionBusyError(f"partition {partition}: its store {path} is in use by {by}") from None
    except OSError as exc:  # say, a read-only directory: no restart would help
        raise PartitionDataError(f"partition {partition}: cannot claim its store {path}: {exc}") from None


def open_store(config: Config, partition: int) -> tuple[LmdbStore, CoreState]:
    """Open the environment, check the recorded partition count, and start a new epoch."""
    store = LmdbStore(config.partition_data_dir(partition), config.map_size_bytes)
    # Opened with a map smaller than its file, a store gets a map of just its used size; bringing it up to date
    # after another version may rewrite much of it (copy on write), so there must be room for that first.
    store.ensure_room(store.used_bytes())
    txn = store.begin(write=True)
    recorded = txn.get_meta(keys.META_PARTITION_COUNT)
    if recorded is not None and keys.unpack_u64(recorded) != config.partitions:
        txn.abort()
        raise PartitionDataError(
            f"{config.data_dir} was created with {keys.unpack_u64(recorded)} partitions;"
            f" refusing to start with --partitions {config.partitions}"
        )
    txn.put_meta(keys.META_PARTITION_COUNT, keys.pack_u64(config.partitions))
    raw_epoch = txn.get_meta(keys.META_EPOCH)
    epoch = (keys.unpack_u64(raw_epoch) if raw_epoch else 0) + 1
    txn.put_meta(keys.META_EPOCH, keys.pack_u64(epoch))
    bring_up_to_date(txn, epoch, store.path)
    state = CoreState(
        partition=partition,
        partition_count=config.partitions,
        epoch=epoch,
        max_history_events=config.max_history_events,
        max_work_item_bytes=config.max_request_bytes,
    )
    state.load_counters(txn)
    raw_generation = txn.get_meta(keys.META_HUB_GENERATION)
    state.hub_generation = keys.unpack_u64(raw_generation) if raw_generation else 0
    txn.commit()
    return store, state


class Gateway:
    """What a partition knows of one gateway: liveness, credits it granted, demand last reported."""

    def __init__(self, identity: bytes, now: int) -> None:
        self.identity = identity
        self.last_seen_ms = now
        # per (worker group, kind): credits granted, and the standing level we may hold (the rest goes back)
        self.credits: dict[tuple[str, str], int] = {}
        self.keep: dict[tuple[str, str], int] = {}
        self.matchers: dict[tuple[str, str], dispatch.Matcher] = {}  # a group's work-item filter per kind
        self.reported: dict[str, int] | None = None


class PartitionProcess:
    def __init__(self, config: Config, partition: int) -> None:
        self.config = config
        self.partition = partition
        self.claim = claim_store(config, partition)  # held until the process exits
        self.store, self.state = open_store(config, partition)
        self.ctx = zmq.Context()
        self.channel: ZmqChannel = None  # type: ignore[assignment]  # bound in serve(), on the loop
        self.outbox = Outbox(self, config)
        self.gateways: dict[bytes, Gateway] = {}
        self.forgotten: dict[bytes, int] = {}  # gateways dropped for silence -> when; told so if they come back
        self.pending: list[tuple[bytes | None, Message]] = []  # posted by the ticker, not received
        self.stopping = False
        self.next_timer_ms: int | None = None
        self.armed_timer_ms: int | None = None
        self.timers_fired = False
        self.work_changed = True  # dispatch and report demand after this batch
        self.lease_ms = int(config.lease_timeout_s * 1000)
        self.crash_requested = False
        self.judged_late = False  # the last tick came late and judged no gateway or lease (housekeeping)

    # main flow
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(STOP_SIGNAL, self.stop)
        self.channel = self.bind()
        if stop_requested():  # the supervisor said stop while this process was starting
            self.stop()
        txn = self.store.begin()
        try:
            self.next_timer_ms = txn.next_timer_ms()
        finally:
            txn.abort()
        self.arm_timer()
        self.outbox.start()
        ticker = asyncio.create_task(self.tick())
        log.info("partition %d serving (epoch %d) at %s", self.partition, self.state.epoch,
                 self.config.partition_endpoint(self.partition))
        try:
            while not self.stopping:
                # Everything that arrived meanwhile (or nothing, when a timer or the ticker woke us).
                self.process(self.next_batch(await self.channel.recv()))
                if self.crash_requested:
                    raise SystemExit(70)
        finally:
            ticker.cancel()
            self.channel.close()
            self.outbox.close()
            self.store.close()
            self.ctx.term()
            log.info("partition %d stopped", self.partition)

    def next_batch(self, received: list[tuple[bytes | None, Message]]) -> list[tuple[bytes | None, Message]]:
        """What arrived, then what the ticker posted: housekeeping judges a gateway's silence only after the
        messages that waited while this process could not run (a long commit, a stall) have been counted."""
        batch, self.pending = received + self.pending, []
        return batch

    def bind(self) -> ZmqChannel:
        endpoint = self.config.partition_endpoint(self.partition)
        try:
            if self.config.zmq_transport == "ipc":  # the supervisor made it, but a tmp cleaner may have removed it
                os.makedirs(self.config.runtime_dir(), exist_ok=True)
            return ZmqChannel.router(self.ctx, endpoint)
        except OSError as exc:
            raise PartitionEndpointError(
                f"partition {self.partition} cannot bind {endpoint}: {exc}; stopping the node"
            ) from None
        except zmq.ZMQError as exc:
            # Another process has the address (with tcp, perhaps another node's partition). Retrying would let
            # this node's gateway talk to whatever holds it, so the node stops instead.
            hint = (" Give each node on a host its own --zmq-base-port."
                    if exc.errno == zmq.EADDRINUSE and self.config.zmq_transport == "tcp" else "")
            raise PartitionEndpointError(
                f"partition {self.partition} cannot bind {endpoint} ({os.strerror(exc.errno)}); stopping the node.{hint}"
            ) from None

    def stop(self) -> None:
        self.stopping = True
        self.channel.wake()

    async def tick(self) -> None:
        """Heartbeat-rate housekeeping: expired leases, silent gateways, stale waiters, outbox resends.

        A tick that comes a whole interval late (by the wall clock, which deadlines use too) may mean this
        process did not run meanwhile: stopped, a stalled disk, a suspended host. It says so, and housekeeping
        leaves gateways and leases unjudged that once, until the heartbeats queued meanwhile have been read.
        """
        interval = min(self.config.heartbeat_interval_s, 1.0)
        while True:
            started = time.time()
            await asyncio.sleep(interval)
            late = time.time() - started - interval
            tick: dict[str, Any] = {"op": "_tick"}
            if late > interval:
                tick["late_s"] = round(late, 3)
            self.pending.append((None, tick))
            self.channel.wake()

    def arm_timer(self) -> None:
        """Wake the loop when the earliest durable timer is due."""
        if self.next_timer_ms is None or self.next_timer_ms == self.armed_timer_ms:
            return
        self.armed_timer_ms = self.next_timer_ms
        delay = max(0.0, self.next_timer_ms / 1000 - time.time())
        asyncio.get_running_loop().call_later(delay + 0.001, self.timer_due, self.next_timer_ms)

    def timer_due(self, fire_ms: int) -> None:
        # Once its wake-up has run, a time is no longer armed: a timer created later for the same
        # (by then past) millisecond, or one the wake-up found not yet due because the wall clock
        # was stepped back, is armed again instead of waiting for the next message or tick.
        if self.armed_timer_ms == fire_ms:
            self.armed_timer_ms = None
        self.channel.wake()

    # one batch
    def process(self, batch: list[tuple[bytes | None, Message]]) -> None:
        now = now_ms()
        commands: list[dict[str, Any]] = []
        for sender, message in batch:
            self.classify(sender, message, now, commands)
        if self.next_timer_ms is not None and self.next_timer_ms <= now:
            commands.append({"op": "fire_timers", "limit": 5000})
            self.timers_fired = True
        actions = self.apply_batch(commands, now) if commands else []
        txn = self.store.begin()
        try:
            self.perform(txn, actions)
            if self.work_changed:
                self.work_changed = False
                self.dispatch_work(txn, now)
                self.report_demand(txn)
            if self.state.oversized:
                oversized, self.state.oversized = self.state.oversized, {}
                self.pending.extend((None, command) for command in oversized.values())
                self.channel.wake()
            if self.timers_fired:
                self.timers_fired = False
                self.next_timer_ms = txn.next_timer_ms()
        finally:
            txn.abort()
        self.arm_timer()

    def classify(self, sender: bytes | None, message: Message, now: int, commands: list[dict[str, Any]]) -> None:
        op = message.get("op")
        if sender is not None and sender.startswith(b"g"):
            gateway = self.gateways.get(sender)
            if gateway is None:
                gateway = self.gateways[sender] = Gateway(sender, now)
                if self.forgotten.pop(sender, None) is not None:
                    # It still counts the credits we dropped with it; it starts over, as after our restart.
                    self.channel.send({"op": "forgot", "p": self.partition, "ep": self.state.epoch}, to=sender)
            gateway.last_seen_ms = now
        if op == "hb":
            self.heartbeat(sender, now, message.get("bar"), message.get("held"))
        elif op == "credit":
            gateway = self.gateways.get(sender)  # type: ignore[arg-type]
            kind = message.get("k")
            if gateway is not None and kind in dispatch.DISPATCHERS:
                slot = (str(message.get("g", "*")), kind)
                if message.get("end"):
                    self.forget_group(gateway, slot)
                    return
                gateway.credits[slot] = gateway.credits.get(slot, 0) + int(message.get("n", 0))
                gateway.keep[slot] = int(message.get("keep", 0))
                if slot not in gateway.matchers:
                    gateway.matchers[slot] = dispatch.matcher(message.get("f"))
                self.work_changed = True
        elif op == "ack":
            self.outbox.on_ack(int(message["from"]), int(message["seq"]), commands)
        elif op == "unwait":
            self.drop_waiters(lambda w: w.sender == sender and w.request_id == message.get("rid"),
                              message.get("i"))
        elif op == "_tick":
            self.housekeeping(now, commands, float(message.get("late_s", 0.0)))
        else:
            message["_from"] = sender
            sent_for = message.get("gep")
            if sent_for is not None and sent_for != self.state.epoch and op not in READ_ONLY_COMMANDS:
                # Meant for a process of this partition that is gone: refused unapplied (the gateway sends it
                # again), answered here, in arrival order, before any heartbeat behind it.
                if "rid" in message:
                    self.channel.send({
                        "op": "reply", "rid": message["rid"], "ep": self.state.epoch,
                        "err": ["stale_epoch", f"partition {self.partition} restarted before this request reached"
                                               " it; it was not applied"],
                    }, to=sender)
                return
            commands.append(message)

    def heartbeat(self, sender: bytes | None, now: int, barrier: Any = None, held: Any = None) -> None:
        """A gateway is alive: renew the leases it says its streams hold, and tell it our epoch.

        A work item's lease lasts as long as a stream holds it. Activities and entity batches run user code that
        may run long, and the SDK queues every kind of item behind one small thread pool, so an orchestrator
        turn can wait there behind slow activities for longer than any fixed lease: were it not renewed it would
        be dispatched again and again, each copy rejected as stale when it finally ran. Only the tokens the
        gateway lists are renewed: an item it never got (a frame dropped on a full queue or a broken tcp link),
        or whose completion or abandon reached it (even one that was then refused), expires and runs again,
        instead of being renewed for the gateway's life.
        """
        if sender is None:
            return
        for token in held if isinstance(held, list) else ():
            lease = self.state.leases_by_token.get(token) if isinstance(token, str) else None
            if lease is not None and lease.gateway == sender:
                lease.expires_ms = now + self.lease_ms
        reply = {"op": "hb", "p": self.partition, "ep": self.state.epoch}
        if barrier is not None:
            reply["bar"] = barrier  # everything this gateway sent before it has been answered or taken in
        self.channel.send(reply, to=sender)
        gateway = self.gateways[sender]
        gateway.reported = None  # re-announce demand after a (re)connect
        self.work_changed = True

    def housekeeping(self, now: int, commands: list[dict[str, Any]], late_s: float = 0.0) -> None:
        # After a late tick, gateways and leases wait one tick to be judged: heartbeats sent while this process
        # did not run may still be on their way in, and would otherwise look like silence, releasing live work.
        # Never twice in a row, so a process that is merely busy judges them at most one tick late.
        judge = not late_s or self.judged_late
        self.judged_late = not judge
        if late_s >= self.config.gateway_timeout_s / 2:
            log.warning("partition %d did not run for %.1f s; gateways and leases are judged at the next tick",
                        self.partition, late_s)
        if judge:
            self.judge_gateways_and_leases(now, commands)
        self.drop_waiters(lambda w: bool(w.deadline_ms) and w.deadline_ms <= now)  # their callers gave up
        self.outbox.resend_due(now)

    def judge_gateways_and_leases(self, now: int, commands: list[dict[str, Any]]) -> None:
        silent_ms = int(self.config.gateway_timeout_s * 1000)
        for identity, gateway in list(self.gateways.items()):
            if now - gateway.last_seen_ms > silent_ms:
                log.warning("partition %d: gateway %r silent; releasing its work items", self.partition, identity)
                del self.gateways[identity]
                for matches in gateway.matchers.values():
                    dispatch.forget(self.state, matches)  # its filtered walks' places, keyed by the matchers' ids
                self.forgotten[identity] = now
                self.drop_waiters(lambda w, gone=identity: w.sender == gone)  # their calls ended with the gateway
                commands.append({"op": "release_gateway", "g": identity})
        for identity, since in list(self.forgotten.items()):
            if now - since > _FORGOTTEN_KEPT_MS:
                del self.forgotten[identity]
        for lease in list(self.state.leases_by_token.values()):
            if lease.expires_ms < now:
                log.warning("partition %d: lease %s expired; requeueing", self.partition, lease.token)
                commands.append({"op": "abandon", "tok": lease.token, "quiet": True})
                # The gateway still counts the item against its stream's limit: that slot is free now.
                self.channel.send({"op": "expired", "tok": lease.token}, to=lease.gateway)

    def drop_waiters(self, which: Callable[[Waiter], bool], instance_id: Any = None) -> None:
        """Forget the waiters `which` selects (of `instance_id` only, when given): nobody waits for their answer."""
        ids = [instance_id] if isinstance(instance_id, str) else list(self.state.waiters)
        for waiting_for in ids:
            kept = [w for w in self.state.waiters.get(waiting_for, ()) if not which(w)]
            if kept:
                self.state.waiters[waiting_for] = kept
            else:
                self.state.waiters.pop(waiting_for, None)

    def apply_batch(self, commands: list[dict[str, Any]], now: int) -> list[Any]:
        """One write transaction for the whole batch; each command in a nested transaction of its own."""
        self.store.ensure_room(_BATCH_HEADROOM_BYTES)
        txn = self.store.begin(write=True)
        actions: list[Any] = []
        # Refusals wait for the commit too: ALREADY_EXISTS or NOT_FOUND may rest on an earlier command of
        # this batch, which a failed commit undoes.
        refusals: list[tuple[dict[str, Any], str, str]] = []
        for command in commands:
            counters = self.state.snapshot_counters()
            child = txn.child()
            try:
                produced = apply(child, command, now, self.state)
                child.commit()
                actions.extend(produced)
            except DurableRuntimeError as exc:
                child.abort()
                self.state.restore_counters(counters)
                refusals.append((command, exc.code, str(exc)))
            except Exception as exc:  # a bug: answer; unless the command only reads, restart from LMDB
                child.abort()
                self.state.restore_counters(counters)
                log.exception("partition %d: command %r failed", self.partition, command.get("op"))
                refusals.append((command, "internal", f"internal error: {exc}"))
                if command.get("op") not in READ_ONLY_COMMANDS:
                    self.crash_requested = True
        self.state.save_counters(txn)
        try:
            txn.commit()
        except lmdb.Error as exc:  # e.g. the disk is full: nothing of this batch was applied
            self.commit_failed(commands, exc)
            return []
        for command, code, message in refusals:
            self.reply_error(command, code, message)
        return actions

    def commit_failed(self, commands: list[dict[str, Any]], exc: Exception) -> None:
        """Answer the whole batch UNAVAILABLE, then restart: in-memory state may be ahead of the store."""
        log.error("partition %d: commit failed (%s); answering UNAVAILABLE and restarting", self.partition, exc)
        message = (
            f"partition {self.partition} could not commit to its store ({exc}); is the disk full?"
            " The request was not applied; retry once space is available"
        )
        for command in commands:
            self.reply_error(command, "unavailable", message)
        self.channel.flush()
        self.crash_requested = True

    def reply_error(self, command: dict[str, Any], code: str, message: str) -> None:
        if "rid" in command and command.get("_from"):
            self.channel.send({"op": "reply", "rid": command["rid"], "err": [code, message]}, to=command["_from"])

    # after commit
    def perform(self, txn: StoreTxn, actions: list[Any]) -> None:
        changed: set[str] = set()
        for action in actions:
            if isinstance(action, act.Reply):
                self.channel.send({"op": "reply", "rid": action.request_id, "ok": action.result}, to=action.to)
            elif isinstance(action, act.SendToPartition):
                self.outbox.wake(action.destination)
            elif isinstance(action, act.AckPartition):
                self.outbox.send_ack(action.sender, action.seq)
            elif isinstance(action, act.StatusChanged):
                changed.add(action.instance_id)
            elif isinstance(action, act.WorkAvailable):
                self.work_changed = True
            elif isinstance(action, act.TimerScheduled):
                if self.next_timer_ms is None or action.fire_ms < self.next_timer_ms:
                    self.next_timer_ms = action.fire_ms
        if changed:
            self.wake_waiters(txn, changed)
        self.outbox.flush_new(txn)

    def wake_waiters(self, txn: StoreTxn, instance_ids: set[str]) -> None:
        for instance_id in instance_ids:
            waiters = self.state.waiters.get(instance_id)
            if not waiters:
                continue
            record = txn.get_instance(instance_id)
            keep = []
            for waiter in waiters:
                if record is None or condition_met(waiter.kind, record["s"]):
                    state = None if record is None else instance_state(txn, instance_id, record, waiter.with_payloads)
                    self.channel.send({"op": "reply", "rid": waiter.request_id, "ok": state}, to=waiter.sender)
                else:
                    keep.append(waiter)
            if keep:
                self.state.waiters[instance_id] = keep
            else:
                del self.state.waiters[instance_id]

    def dispatch_work(self, txn: StoreTxn, now: int) -> None:
        """Spend the credits gateways granted; hand back whatever exceeds their standing level."""
        for gateway in self.gateways.values():
            for (group, kind), credit in gateway.credits.items():
                if credit <= 0:
                    continue
                items = dispatch.DISPATCHERS[kind](
                    txn, self.state, gateway.identity, credit, now, self.lease_ms, gateway.matchers.get((group, kind))
                )
                for token, item in items:
                    self.channel.send({"op": "wi", "k": kind, "g": group, "tok": token, "wi": item}, to=gateway.identity)
                credit -= len(items)
                excess = credit - gateway.keep.get((group, kind), 0)
                if excess > 0:
                    credit -= excess
                    self.channel.send(
                        {"op": "ret", "k": kind, "g": group, "n": excess, "p": self.partition}, to=gateway.identity
                    )
                gateway.credits[(group, kind)] = credit

    def forget_group(self, gateway: Gateway, slot: tuple[str, str]) -> None:
        """The gateway has no stream of this group (one per distinct set of work-item filters) left: hand its
        credits back and drop what we kept for it, filters and the filtered walk's place included."""
        group, kind = slot
        credit = gateway.credits.pop(slot, 0)
        gateway.keep.pop(slot, None)
        dispatch.forget(self.state, gateway.matchers.pop(slot, None))
        if credit > 0:
            self.channel.send({"op": "ret", "k": kind, "g": group, "n": credit, "p": self.partition},
                              to=gateway.identity)

    def report_demand(self, txn: StoreTxn) -> None:
        """Tell gateways how much ready work we could not dispatch for lack of credits."""
        if not self.gateways:
            return
        current = dispatch.demand(txn, self.state)
        for gateway in self.gateways.values():
            if gateway.reported != current:
                gateway.reported = dict(current)
                self.channel.send({"op": "demand", "p": self.partition, "ep": self.state.epoch, **current},
                                  to=gateway.identity)
