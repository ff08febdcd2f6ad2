"""The transaction of `meshlet apply`: all-or-nothing under CAS, and racing applies."""

from __future__ import annotations

import asyncio

import pytest

import config
from discovery.consul import connect
from supervisor.commands.apply import CREATED, TxnConflict, apply_services, plan_apply, read_state, txn, txn_chunks

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)


def services(*names: str) -> dict[str, config.ServiceSpec]:
    text = "services:\n" + "".join(f"  {n}: {{command: [x], ports: [{{name: http}}]}}\n" for n in names)
    return dict(config.loads(text, base_dir="/").services)


async def test_a_stale_plan_writes_nothing(catalog) -> None:
    """Two applies read the same state and both pick the lowest free VIP; the second one's
    transaction fails as a whole: neither its document nor its VIP key is written."""
    a, b = connect(catalog.access), connect(catalog.access)
    try:
        state = await read_state(a)
        plan_a = plan_apply(services("alpha"), state.docs, state.vips, "127.30.0.0/24", False)
        plan_b = plan_apply(services("beta", "gamma"), state.docs, state.vips, "127.30.0.0/24", False)
        assert plan_a.changes[0].vip == plan_b.changes[0].vip == "127.30.0.1"
        (chunk_a,) = txn_chunks(plan_a, state.doc_index, state.vip_index)
        (chunk_b,) = txn_chunks(plan_b, state.doc_index, state.vip_index)
        await txn(a, [op for _, ops in chunk_a for op in ops])
        with pytest.raises(TxnConflict, match="meshlet/vips/127.30.0.1"):
            await txn(b, [op for _, ops in chunk_b for op in ops])
        after = await read_state(b)
        assert sorted(after.docs) == ["alpha"]  # gamma's own VIP (.2) was free, yet nothing of b landed
        assert after.vips == {"127.30.0.1": "alpha"}
    finally:
        await a.close()
        await b.close()


async def test_racing_applies_all_succeed_with_distinct_vips(catalog) -> None:
    clients = [connect(catalog.access) for _ in range(4)]
    try:
        wanted = [services(*(f"r{i}s{j}" for j in range(3))) for i in range(4)]
        results = await asyncio.gather(*(apply_services(c, w, "127.30.0.0/28") for c, w in zip(clients, wanted)))
        assert [sorted(c.action for c in r) for r in results] == [[CREATED] * 3] * 4
        state = await read_state(clients[0])
        assert len(state.docs) == 12
        vips = [d["vip"] for d in state.docs.values()]
        assert len(set(vips)) == 12
        assert state.vips == {d["vip"]: name for name, d in state.docs.items()}
        reported = {c.name: c.vip for r in results for c in r}
        assert reported == {name: d["vip"] for name, d in state.docs.items()}  # what was printed is what holds
    finally:
        for c in clients:
            await c.close()
