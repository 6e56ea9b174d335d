"""Backlog reads shared between sockets: plans in batches, identical pages once.

A socket's plan (models/inbox.py backlog_plan: which conversations have news, and every
conversation's received marker) is what it needs before any live frame can be released in order,
so it is read at once, never queued behind other sockets' backlogs (server/session.py). The plans
of sockets connecting while a read is under way go to the database together in the next read: a
reconnect storm of 2,000 sockets costs a few dozen queries instead of five per socket. At low load
a batch is one user and nothing waits for a timer.

Pages of messages are read per conversation, but sockets asking for the same page at the same
time (the members of a group reconnecting with the same received marker) share one read.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping
from typing import Any

from models.conversations import ConversationRef
from models.inbox import Inbox
from server.fanout import ChangeStreamFanout

MAX_PLAN_BATCH = 500
MAX_PLANS_IN_FLIGHT = 2

Plan = list[tuple[ConversationRef, int, int]]


class BacklogPlanner:
    def __init__(self, inbox: Inbox, fanout: ChangeStreamFanout | None = None) -> None:
        self._inbox = inbox
        self._fanout = fanout
        # user -> the sockets waiting for its plan (two sockets of one user share one read)
        self._waiting: dict[str, list[asyncio.Future[Plan]]] = {}
        self._reads: set[asyncio.Task[None]] = set()  # kept: the loop holds tasks only weakly
        # (conversation key, after) -> the page read under way, for every socket that asks for it
        self._pages: dict[tuple[str, int], tuple[float, asyncio.Future[list[dict[str, Any]]]]] = {}

    async def plan_for(self, user: str) -> Plan:
        """The user's backlog plan, read with those of the other sockets waiting for one."""
        future: asyncio.Future[Plan] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(user, []).append(future)
        self._start_reads()
        return await future

    async def page(self, ref: ConversationRef, after: int, since: float) -> list[dict[str, Any]]:
        """A page of the conversation's messages above after (models/inbox.py message_page),
        shared with the sockets asking for the same page meanwhile. Callers must not change it.

        since: when the asking socket was registered with the hub (time.monotonic()). Only a read
        begun after that is shared: a message stored after a read began has reached the socket
        live, one stored before is in the read; an older read might hold neither.
        """
        key = (ref.key, after)
        shared = self._pages.get(key)
        if shared is None or shared[0] < since:
            shared = self._pages[key] = (time.monotonic(), asyncio.ensure_future(self._inbox.message_page(ref, after)))
            shared[1].add_done_callback(functools.partial(self._page_done, key, shared))
        # shield: one socket going away (its task cancelled) does not cancel the others' read
        return await asyncio.shield(shared[1])

    def _page_done(self, key: tuple[str, int], shared: tuple[float, asyncio.Future[Any]], _f: object) -> None:
        if self._pages.get(key) is shared:  # not a newer read of the same page
            del self._pages[key]

    def _start_reads(self) -> None:
        while self._waiting and len(self._reads) < MAX_PLANS_IN_FLIGHT:
            users = list(self._waiting)[:MAX_PLAN_BATCH]
            batch = {user: self._waiting.pop(user) for user in users}
            task = asyncio.get_running_loop().create_task(self._read(batch))
            self._reads.add(task)
            task.add_done_callback(self._read_done)

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._reads.discard(task)
        self._start_reads()

    async def _read(self, batch: Mapping[str, list[asyncio.Future[Plan]]]) -> None:
        try:
            # Read at the batch's start, like the plan itself: messages stored elsewhere since
            # then reach the sockets live (server/fanout.py).
            just_stored = {u: self._fanout.just_stored.for_user(u) for u in batch} if self._fanout else {}
            plans = await self._inbox.backlog_plans(list(batch), just_stored)
        except Exception as exc:  # every socket of the batch hears it (and retries or closes)
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
        else:
            for user, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(list(plans[user]))  # a copy each: sockets do not share state
