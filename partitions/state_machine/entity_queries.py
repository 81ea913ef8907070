"""GetEntity, QueryEntities and CleanEntityStorage: one partition's share, in entity-id order."""

from __future__ import annotations

from typing import Any

from partitions.state_machine.context import Ctx, Record

MAX_PAGE = 1000


def entity_metadata(ctx: Ctx, entity_id: str, record: Record, with_state: bool) -> dict[str, Any]:
    return {
        "i": entity_id,
        "lm": record["lm"],
        "q": ctx.txn.inbox_count(entity_id),
        "lo": record["lo"],
        "st": record["st"] if with_state else None,
    }


def _exists(record: Record) -> bool:
    """An entity exists when it has state; a transient one only has queued work or a lock."""
    return record["st"] is not None


def apply_get_entity(ctx: Ctx, cmd: dict[str, Any]) -> None:
    record = ctx.txn.get_entity(cmd["i"])
    if record is None or not (_exists(record) or record["lk"]):
        ctx.reply(cmd, None)
        return
    ctx.reply(cmd, entity_metadata(ctx, cmd["i"], record, bool(cmd.get("st"))))


def apply_query_entities(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Entities with ids starting with `prefix` after `after`, last modified in [lf, lt)."""
    limit = min(int(cmd.get("limit") or MAX_PAGE), MAX_PAGE)
    modified_from, modified_to = cmd.get("lf") or 0, (1 << 63) if cmd.get("lt") is None else cmd["lt"]
    page = []
    for entity_id, record in ctx.txn.scan_entities(cmd.get("prefix") or "@", cmd.get("after") or ""):
        if not (_exists(record) or cmd.get("tr")) or not modified_from <= record["lm"] < modified_to:
            continue
        page.append(entity_metadata(ctx, entity_id, record, bool(cmd.get("st"))))
        if len(page) >= limit:
            break
    ctx.reply(cmd, page)


def apply_clean_entities(ctx: Ctx, cmd: dict[str, Any]) -> None:
    """Remove empty entities (no state, no lock, no queue); list the locks for the gateway to check."""
    removed, locks = 0, []
    for entity_id, record in list(ctx.txn.scan_entities("@", "")):
        if record["lk"]:
            locks.append([entity_id, record["lo"], record["lk"]])
        elif cmd.get("empty") and record["st"] is None and not record["rq"] and not ctx.txn.has_inbox(entity_id):
            ctx.txn.delete_entity(entity_id)
            removed += 1
    ctx.reply(cmd, {"removed": removed, "locks": locks})
