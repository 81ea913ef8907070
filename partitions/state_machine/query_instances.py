"""QueryInstances, ListInstanceIds and purge by filter: one partition's share, served from its indexes.

Each partition answers in a fixed order, (created_ms, id) or (completed_ms, id), starting after the
caller's continuation point; the gateway merges the partitions' pages in the same order.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

from partitions.state_machine import events as ev
from partitions.state_machine.context import Ctx
from partitions.state_machine.purge_instance import remove_instance
from partitions.state_machine.queries import instance_state
from partitions.store.lmdb_store import StoreTxn

_FOREVER_MS = (1 << 63) - 1
MAX_PAGE = 1000
MAX_PURGE_BATCH = 500


def _upper(bound: int | None) -> int:
    """An upper time bound: absent is none, and 0 (at or before 1970, clamped) matches nothing, not everything."""
    return _FOREVER_MS if bound is None else bound


def _after(point: list[Any] | None) -> tuple[int, str]:
    return (int(point[0]), str(point[1])) if point else (-1, "")


def _created_candidates(txn: StoreTxn, cmd: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """Instances in (created_ms, id) order within the created range, from the cheapest index."""
    start, end = cmd.get("cf") or 0, _upper(cmd.get("ct"))
    start = max(start, _after(cmd.get("after"))[0])
    if cmd.get("statuses"):
        yield from heapq.merge(*(txn.scan_status(s, start, end) for s in set(cmd["statuses"])))
    else:
        yield from txn.scan_created(start, end)


def _prefix_candidates(txn: StoreTxn, cmd: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """Instances with the id prefix in id order (prefix pages are ordered by id), after `after`."""
    after_id = _after(cmd.get("after"))[1]
    for instance_id in txn.scan_instance_ids(cmd["prefix"]):
        if instance_id > after_id:
            yield -1, instance_id


def apply_query(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Up to `limit` instance states matching statuses, created range and id prefix, after `after`.

    Pages are in (created_ms, id) order, or in id order when an id prefix is given.
    """
    by_prefix = bool(cmd.get("prefix"))
    after = _after(cmd.get("after"))
    statuses = set(cmd.get("statuses") or ())
    start, end = cmd.get("cf") or 0, _upper(cmd.get("ct"))
    limit = min(int(cmd.get("limit") or MAX_PAGE), MAX_PAGE)
    candidates = _prefix_candidates(ctx.txn, cmd) if by_prefix else _created_candidates(ctx.txn, cmd)
    page = []
    for created, instance_id in candidates:
        if not by_prefix and (created, instance_id) <= after:
            continue
        record = ctx.load(instance_id)
        if record is None or (statuses and record["s"] not in statuses) or not start <= record["c"] < end:
            continue
        page.append(instance_state(ctx.txn, instance_id, record, bool(cmd.get("pl"))))
        if len(page) >= limit:
            break
    ctx.reply(cmd, page)


def apply_list_ids(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Terminal instances in (completed_ms, id) order, filtered by status and completed range."""
    after = _after(cmd.get("after"))
    statuses = set(cmd.get("statuses") or ())
    limit = min(int(cmd.get("limit") or MAX_PAGE), MAX_PAGE)
    start = max(cmd.get("df") or 0, after[0])
    page = []
    for completed, instance_id, status in ctx.txn.scan_completed(start, _upper(cmd.get("dt"))):
        if (completed, instance_id) <= after or (statuses and status not in statuses):
            continue
        page.append([completed, instance_id])
        if len(page) >= limit:
            break
    ctx.reply(cmd, page)


def apply_purge_filter(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Purge one bounded batch of terminal instances in the created range; never a running one.

    With `r` (recursive), an instance that started sub-orchestrations is not purged here but named in "trees":
    the gateway purges each such tree whole, children first, or none of it while an instance in it still runs.
    "last" is where the next batch goes on, past the trees left to the gateway.
    """
    statuses = (set(cmd.get("statuses") or ()) or set(ev.TERMINAL)) & ev.TERMINAL
    after = _after(cmd.get("after"))
    deleted, trees, more, last = 0, [], False, None
    scan = {"cf": cmd.get("cf"), "ct": cmd.get("ct"), "statuses": sorted(statuses), "after": cmd.get("after")}
    for created, instance_id in list(_created_candidates(ctx.txn, scan)) if statuses else ():
        if (created, instance_id) <= after:
            continue
        record = ctx.load(instance_id)
        if record is None or record["s"] not in ev.TERMINAL or record["s"] not in statuses:
            continue
        if deleted + len(trees) >= MAX_PURGE_BATCH:
            more = True
            break
        last = [created, instance_id]
        if cmd.get("r") and record.get("ch"):
            trees.append(instance_id)
            continue
        remove_instance(ctx, instance_id, record)
        deleted += 1
    # "children" is what a gateway of the earlier version reads; this version names no child to purge afterwards.
    ctx.reply(cmd, {"deleted": deleted, "more": more, "trees": trees, "last": last, "children": []})


def apply_history(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """The committed history of the current execution (None if unknown, or another execution asked)."""
    record = ctx.load(cmd["i"])
    if record is None or (cmd.get("x") and cmd["x"] != record["x"]):
        ctx.reply(cmd, None)
        return
    ctx.reply(cmd, {"x": record["x"], "events": ctx.txn.history(cmd["i"])})
