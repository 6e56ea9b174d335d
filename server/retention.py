"""The retention purge as this process runs it (SPEC §15): at start-up, every interval_hours, and on
demand (POST /api/v1/retention/run), one process at a time.

"One at a time" is a lease in the database, not a lock in memory: a document in `leases`
(`{_id: "retention", owner, until}`, `until` in unix seconds — numbers, since nx-27017 compares
dates at whole seconds) that a purge takes with one conditional upsert, renews between its batches
and gives back when done. A process that dies mid-purge leaves a lease that runs out after
LEASE_SECS; the next purge (of any process) then takes it. A purge that finds its lease taken over
(it stalled past LEASE_SECS) stops at its next batch. The document also keeps the last run's end
and counts, so the periodic purges of several processes do not each redo the same work.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from typing import Any

import pymongo
from pymongo import ReturnDocument, WriteConcern
from pymongo.errors import DuplicateKeyError, PyMongoError

from models.database import Database
from models.principal import Principal
from models.retention import BATCH_TIMEOUT_SECS, Purger, PurgeRunning, require_admin
from server.db import process_token

log = logging.getLogger(__name__)

LEASE_NAME = "retention"
LEASE_SECS = 120.0
RETRY_AFTER_FAILURE_SECS = 600.0  # a purge that failed (database away) is tried again this soon
STOP_TIMEOUT_SECS = 2.0  # shutting down waits at most this long for the schedule to end


class LeaseLost(PurgeRunning):
    """Another process took the lease over (ours ran out while we were stalled): that one purges now."""


class DatabaseLease:
    """A named lease in the `leases` collection, held by one owner until it expires or is released."""

    def __init__(self, db: Database, name: str, lease_secs: float = LEASE_SECS, owner: str | None = None):
        self._leases = db.get_collection("leases", write_concern=WriteConcern(w=1))
        self.name = name
        self.lease_secs = lease_secs
        self.owner = owner or process_token()
        self._until = 0.0

    async def acquire(self) -> bool:
        """Take the lease if it is free or expired; False if another owner holds it."""
        now = time.time()
        try:
            doc = await self._leases.find_one_and_update(
                {"_id": self.name, "until": {"$lt": now}},
                {"$set": {"owner": self.owner, "until": now + self.lease_secs, "startedAt": now}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:  # MongoDB: held, so the upsert tried to insert a second one
            return False
        # nx-27017 answers a held lease's upsert with no document instead of a duplicate key.
        if doc is None or doc.get("owner") != self.owner:
            return False
        self._until = now + self.lease_secs
        return True

    async def renew(self) -> None:
        """Extend the lease when half of it is used; LeaseLost if another owner has it now."""
        now = time.time()
        if now < self._until - self.lease_secs / 2:
            return
        result = await self._leases.update_one(
            {"_id": self.name, "owner": self.owner}, {"$set": {"until": now + self.lease_secs}}
        )
        if not result.matched_count:
            raise LeaseLost(f"lease {self.name!r} was taken over")
        self._until = now + self.lease_secs

    async def release(self, **record: Any) -> None:
        """Give the lease back (keeping `record`, e.g. the last run's counts, on the document)."""
        await self._leases.update_one(
            {"_id": self.name, "owner": self.owner}, {"$set": {"until": 0.0, "releasedAt": time.time(), **record}}
        )
        self._until = 0.0

    async def read(self) -> dict[str, Any] | None:
        return await self._leases.find_one({"_id": self.name})


class RetentionRunner:
    """Runs the purge under the lease: at start-up, then every interval_hours, and on demand."""

    def __init__(self, purger: Purger, lease: DatabaseLease, interval_hours: float):
        self._purger = purger
        self._lease = lease
        self._interval_secs = interval_hours * 3600
        self._running = asyncio.Lock()  # this process: one purge at a time (the lease: all processes)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_asked = asyncio.Event()

    async def run_now(self, principal: Principal) -> dict[str, int]:
        """POST /api/v1/retention/run (admin): purge now; PurgeRunning (409) if a purge is running."""
        require_admin(principal)
        counts = await self._run(principal)
        if counts is None:
            raise PurgeRunning("a retention purge is running already; try again when it is done")
        return counts

    async def run_for_testing(self, now: datetime.datetime | None = None) -> dict[str, int] | None:
        """One scheduled purge (as the server's own schedule runs it), optionally at another time."""
        return await self._run(None, now=now)

    def start(self) -> None:
        """The start-up purge, then one every interval (in the background: serving does not wait)."""
        if self._task is None:
            self._stopping = False
            self._stop_asked = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._schedule())

    async def stop(self) -> None:
        """Stop the schedule; a purge in progress stops between two batches (the lease expires)."""
        if self._task is not None:
            self._stopping = True  # a cancellation the driver turns into an error still ends the loop
            self._stop_asked.set()
            self._task.cancel()
            await asyncio.wait([self._task], timeout=STOP_TIMEOUT_SECS)
            self._task = None

    async def _schedule(self) -> None:
        first = True
        while not self._stopping:
            pause = self._interval_secs
            try:
                if first or await self._due():
                    await self._run(None)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database away, a lease lost: log, and try again later
                if self._stopping:
                    return
                log.exception("retention purge failed; trying again in %.0fs", RETRY_AFTER_FAILURE_SECS)
                pause = min(pause, RETRY_AFTER_FAILURE_SECS)
            first = False
            with contextlib.suppress(TimeoutError):  # stop() ends the pause at once
                await asyncio.wait_for(self._stop_asked.wait(), pause)

    async def _due(self) -> bool:
        """A periodic purge is due unless another process finished one within the interval."""
        doc = await self._lease.read()
        finished = (doc or {}).get("releasedAt")
        return not isinstance(finished, int | float) or time.time() - finished >= self._interval_secs * 0.9

    async def _run(self, principal: Principal | None, now: datetime.datetime | None = None) -> dict[str, int] | None:
        """One purge under the lease; None when another purge holds it."""
        if self._running.locked():
            return None
        async with self._running:
            with pymongo.timeout(BATCH_TIMEOUT_SECS):
                acquired = await self._lease.acquire()
            if not acquired:
                log.info("retention purge skipped: another process holds the lease")
                return None
            counts: dict[str, int] | None = None
            try:
                counts = await self._purger.purge(principal, now=now, between_batches=self._lease.renew)
                return counts
            finally:
                with contextlib.suppress(PyMongoError), pymongo.timeout(BATCH_TIMEOUT_SECS):  # else it runs out
                    await self._lease.release(**({"lastCounts": counts} if counts is not None else {}))
