"""models/batching.py against the real database: one outcome per caller, batches under load."""

from __future__ import annotations

import asyncio

import pytest
from pymongo import UpdateOne, WriteConcern
from pymongo.errors import DuplicateKeyError

from models.batching import BatchedInserts, BatchedUpdates


@pytest.mark.gen_test
async def test_concurrent_inserts_each_get_their_own_outcome(services):
    collection = services.db.get_collection("batch_probe", write_concern=WriteConcern(j=True))
    await collection.create_index("k", unique=True)
    inserts = BatchedInserts(collection)
    docs = [{"_id": f"d{i}", "k": i} for i in range(60)] + [{"_id": "dup", "k": 7}]
    results = await asyncio.gather(*[inserts.insert(doc) for doc in docs], return_exceptions=True)
    assert results[:60] == [None] * 60
    assert isinstance(results[60], DuplicateKeyError)
    assert await collection.count_documents({}) == 60


@pytest.mark.gen_test
async def test_updates_never_move_a_summary_backwards(services):
    collection = services.db.batch_summary
    updates = BatchedUpdates(collection)

    def advance(key: str, seq: int) -> UpdateOne:
        return UpdateOne({"_id": key, "last": {"$lt": seq}}, {"$set": {"last": seq}}, upsert=True)

    await asyncio.gather(updates.update(advance("a", 5)), updates.update(advance("b", 1)))
    await asyncio.gather(updates.update(advance("a", 3)), updates.update(advance("b", 2)))
    assert {d["_id"]: d["last"] async for d in collection.find()} == {"a": 5, "b": 2}
