"""Write batching that still acknowledges only stored documents.

Concurrent sends each wait for their own document, but the documents that arrive while a write is
in flight go to the database together in the next insert_many / bulk_write (unordered, journaled).
At low load a batch is one document and nothing waits for a timer; under load one round trip
carries many messages. Each caller gets its own outcome: stored, DuplicateKeyError for its
document, or the error of the whole batch (then nothing is acknowledged and the sender retries
with its clientMsgId). A document the driver cannot encode (a lone surrogate, an int over 64
bits) fails the whole insert before anything is sent; the batch is then split until that error
lands on its own item, so one bad document never fails the others (LESSONS 13).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from bson.errors import InvalidDocument, InvalidStringData
from pymongo import UpdateMany, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, WriteConcernError

MAX_BATCH = 500
MAX_IN_FLIGHT = 2
DUPLICATE_KEY = 11000
# Raised by the driver while encoding a batch, before any byte is sent: nothing of it was written.
# This holds because a batch fits one wire message (MAX_BATCH documents of at most a JSON body's
# 64 KiB each stay far below the 48 MB message limit), so no earlier part of it was sent already.
ENCODING_ERRORS = (InvalidDocument, InvalidStringData, UnicodeEncodeError, OverflowError)

Item = TypeVar("Item")


class _Batcher(Generic[Item]):
    """Queues items and flushes them in batches, at most MAX_IN_FLIGHT batches at a time."""

    def __init__(self, flush: Callable[[Sequence[Item]], Any]):
        self._flush_batch = flush
        self._queue: list[tuple[Item, asyncio.Future[None]]] = []
        self._in_flight = 0

    async def submit(self, item: Item) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._start_flushes()
        await future

    def _start_flushes(self) -> None:
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[Item, asyncio.Future[None]]]) -> None:
        try:
            failures = await self._flush_attributed([item for item, _ in batch])
        except Exception as exc:  # the whole batch failed: every caller hears it
            failures = {i: exc for i in range(len(batch))}
        finally:
            self._in_flight -= 1
        for index, (_item, future) in enumerate(batch):
            if future.done():
                continue
            error = failures.get(index)
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        self._start_flushes()

    async def _flush_attributed(self, items: list[Item]) -> dict[int, Exception]:
        """Flush items; when encoding fails (nothing written), flush halves until the error is one item's."""
        try:
            flushed: dict[int, Exception] = await self._flush_batch(items)
            return flushed
        except ENCODING_ERRORS as exc:
            if len(items) == 1:
                return {0: exc}
        # Halving costs about 2·log2(n) round trips per bad item, only in this rare path.
        middle = len(items) // 2
        failures: dict[int, Exception] = {}
        for offset, part in ((0, items[:middle]), (middle, items[middle:])):
            try:
                part_failures = await self._flush_attributed(part)
            except Exception as exc:  # this part failed whole (the database went away): only its items hear it
                part_failures = dict.fromkeys(range(len(part)), exc)
            failures.update({offset + index: error for index, error in part_failures.items()})
        return failures


def _per_item_errors(exc: BulkWriteError, count: int, ignore_duplicates: bool) -> dict[int, Exception]:
    """Map an unordered bulk error of a batch of count items to the items it concerns."""
    details = exc.details
    if details.get("writeConcernErrors"):
        # Written, perhaps, but not as durably as promised: nothing in the batch is acknowledged.
        error = WriteConcernError(str(details["writeConcernErrors"][0].get("errmsg", "write concern")))
        return dict.fromkeys(range(count), error)
    failures: dict[int, Exception] = {}
    for write_error in details.get("writeErrors", []):
        if write_error.get("code") == DUPLICATE_KEY:
            if ignore_duplicates:
                continue
            failures[write_error["index"]] = DuplicateKeyError(
                write_error.get("errmsg", "duplicate key"), DUPLICATE_KEY, write_error
            )
        else:
            failures[write_error["index"]] = OperationFailure(
                write_error.get("errmsg", "write failed"), write_error.get("code"), write_error
            )
    return failures


class BatchedInserts:
    """insert(doc) resolves once doc is stored; raises DuplicateKeyError for a duplicate doc."""

    def __init__(self, collection: AsyncCollection[dict[str, Any]]):
        self._collection = collection
        self._batcher: _Batcher[dict[str, Any]] = _Batcher(self._flush)

    async def insert(self, doc: dict[str, Any]) -> None:
        await self._batcher.submit(doc)

    async def _flush(self, docs: Sequence[dict[str, Any]]) -> dict[int, Exception]:
        try:
            await self._collection.insert_many(list(docs), ordered=False)
        except BulkWriteError as exc:
            return _per_item_errors(exc, len(docs), ignore_duplicates=False)
        return {}


class BatchedUpdates:
    """update(op) resolves once the UpdateOne is applied; an upsert that finds its document newer
    (duplicate key on insert) counts as applied, or, with report_newer, raises DuplicateKeyError
    (for a caller that has more to do then)."""

    def __init__(self, collection: AsyncCollection[dict[str, Any]], *, report_newer: bool = False):
        self._collection = collection
        self._ignore_duplicates = not report_newer
        self._batcher: _Batcher[UpdateOne] = _Batcher(self._flush)

    async def update(self, operation: UpdateOne) -> None:
        await self._batcher.submit(operation)

    async def _flush(self, operations: Sequence[UpdateOne]) -> dict[int, Exception]:
        try:
            await self._collection.bulk_write(list(operations), ordered=False)
        except BulkWriteError as exc:
            return _per_item_errors(exc, len(operations), ignore_duplicates=self._ignore_duplicates)
        return {}


class BatchedMarks:
    """mark(claim, id) resolves once `$set: fields()` is applied to the document `id` if it is
    still held by `claim` (in claim_field). Concurrent marks go in one bulk write with one
    UpdateMany per claim: nx-27017 applies an update by `_id $in` for far less per document than
    the same number of UpdateOne (a dispatcher marking its deliveries, server/webhooks.py)."""

    def __init__(
        self, collection: AsyncCollection[dict[str, Any]], claim_field: str, fields: Callable[[], dict[str, Any]]
    ):
        self._collection = collection
        self._claim_field = claim_field
        self._fields = fields
        self._batcher: _Batcher[tuple[str, Any]] = _Batcher(self._flush)

    async def mark(self, claim: str, doc_id: Any) -> None:
        await self._batcher.submit((claim, doc_id))

    async def _flush(self, marks: Sequence[tuple[str, Any]]) -> dict[int, Exception]:
        by_claim: dict[str, list[Any]] = {}
        for claim, doc_id in marks:
            by_claim.setdefault(claim, []).append(doc_id)
        fields = self._fields()
        await self._collection.bulk_write(
            [
                UpdateMany({"_id": {"$in": ids}, self._claim_field: claim}, {"$set": fields})
                for claim, ids in by_claim.items()
            ],
            ordered=False,
        )
        return {}
