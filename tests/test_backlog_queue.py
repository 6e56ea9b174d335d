"""Live messages never wait behind other sockets' backlogs (issue 20): a socket queued for a backlog
slot gets live messages of its quiet conversations at once, and those of a conversation with a
backlog right after that conversation's backlog, in seq order, with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from server.services import CONCURRENT_BACKLOGS


@contextlib.asynccontextmanager
async def backlog_slots_taken(services):
    """Every backlog slot busy (a reconnect storm's sockets ahead in the queue)."""
    for _ in range(CONCURRENT_BACKLOGS):
        await services.backlog_slots.acquire()
    try:
        yield
    finally:
        for _ in range(CONCURRENT_BACKLOGS):
            services.backlog_slots.release()


@pytest.mark.gen_test(timeout=30)
async def test_live_message_in_a_quiet_conversation_does_not_wait_for_a_backlog_slot(api, services):
    for i in range(3):
        await api.send_pm("Rose", "Jack", f"b{i}")
    async with backlog_slots_taken(services):
        jack = await api.ws("Jack")
        live = await api.send_pm("Lily", "Jack", "live")
        assert (await jack.recv_type("message"))["message"] == live
    seqs = [(await jack.recv_type("message"))["message"]["seq"] for _ in range(3)]
    assert seqs == [1, 2, 3]
    await jack.expect_silence()


@pytest.mark.gen_test(timeout=30)
async def test_live_message_follows_its_own_conversations_backlog_while_the_queue_waits(api, services):
    for i in range(5):
        await api.send_pm("Rose", "Jack", f"b{i}")
    await api.send_pm("Lily", "Jack", "another backlog, still queued")
    async with backlog_slots_taken(services):
        jack = await api.ws("Jack")
        await asyncio.sleep(0.1)  # the plan is read; the backlog waits for a slot
        await api.send_pm("Rose", "Jack", "live")
        got = [(await jack.recv_type("message"))["message"] for _ in range(6)]
        assert [(m["from"], m["seq"]) for m in got] == [("Rose", s) for s in range(1, 7)]
        await jack.expect_silence()  # Lily's conversation still waits for a slot
    lily = (await jack.recv_type("message"))["message"]
    assert (lily["from"], lily["seq"]) == ("Lily", 1)
    await jack.expect_silence()


@pytest.mark.gen_test(timeout=30)
async def test_sockets_connecting_together_get_their_own_backlogs(api):
    users = [f"P{i}" for i in range(12)]
    for i, user in enumerate(users):
        for k in range(i % 3 + 1):
            await api.send_pm("Rose", user, f"{user}-{k}")
    sockets = await asyncio.gather(*(api.ws(u) for u in users))  # planned in one batch or a few
    for i, sock in enumerate(sockets):
        got = [(await sock.recv_type("message"))["message"] for _ in range(i % 3 + 1)]
        assert [m["content"] for m in got] == [f"{users[i]}-{k}" for k in range(i % 3 + 1)]
        await sock.expect_silence()
