"""KeyedLocks: one holder per key at a time, keys independent, nothing left behind."""

from __future__ import annotations

import asyncio

import pytest

from models.keyed_locks import KeyedLocks


@pytest.mark.gen_test
async def test_one_holder_per_key_and_other_keys_run_meanwhile() -> None:
    locks, order = KeyedLocks(), list[str]()

    async def work(key: str, name: str) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            await asyncio.sleep(0.01)
            order.append(f"{name} out")

    await asyncio.gather(work("a", "a1"), work("a", "a2"), work("b", "b1"))
    assert order.index("a1 out") < order.index("a2 in")
    assert order.index("b1 in") < order.index("a1 out")  # b did not wait for a
    assert len(locks) == 0


@pytest.mark.gen_test
async def test_a_waiter_cancelled_or_a_holder_failing_leaves_no_lock_behind() -> None:
    locks = KeyedLocks()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("c"):
            entered.set()
            await release.wait()
            raise ValueError("the work failed")

    async def waiter() -> None:
        async with locks.hold("c"):
            pytest.fail("a cancelled waiter must not get the lock")

    held = asyncio.ensure_future(holder())
    await entered.wait()
    waiting = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(locks) == 1  # the holder still has it
    release.set()
    with pytest.raises(ValueError):
        await held
    assert len(locks) == 0
    async with locks.hold("c"):  # and the key is free again
        assert len(locks) == 1
