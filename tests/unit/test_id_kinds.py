"""Which ids name orchestrations and which name entities: the two kinds share the inbox table, so neither may
take the other's form."""

from __future__ import annotations

import pytest

from partitions.store.keys import entity_id_problem, orchestration_id_problem


@pytest.mark.parametrize("entity_id", ["@counter@k", "@Counter@a b", "@n@" + "k" * 400, "@user@alice@example.com"])
def test_entity_ids_read_at_name_at_key(entity_id: str) -> None:
    assert entity_id_problem(entity_id) is None


@pytest.mark.parametrize("entity_id", ["", "counter@k", "@counter", "@@k", "@counter@", "@@", "@c@k\x00"])
def test_other_entity_ids_are_refused(entity_id: str) -> None:
    assert entity_id_problem(entity_id) is not None


def test_orchestration_ids_may_not_start_with_at() -> None:
    assert orchestration_id_problem("order-7") is None
    assert orchestration_id_problem("a@b") is None
    assert "reserved for entities" in (orchestration_id_problem("@counter@k") or "")
    assert orchestration_id_problem("") == "must not be empty"
