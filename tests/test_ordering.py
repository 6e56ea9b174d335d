"""server/ordering.py on its own: in-order release, duplicates dropped, gaps repaired."""

from __future__ import annotations

import pytest

from models.conversations import ConversationRef
from server.fanout import JustStored
from server.ordering import InOrderDelivery
from tests.helpers import wait_until


class Recorder:
    def __init__(self, stored: dict[int, str] | None = None):
        self.sent: list[str] = []
        self.stored = stored or {}
        self.fetches: list[tuple[str, int, int]] = []

    async def fetch(self, key: str, after: int, before: int) -> list[tuple[int, str]]:
        self.fetches.append((key, after, before))
        return [(seq, frame) for seq, frame in sorted(self.stored.items()) if after < seq < before]


@pytest.mark.gen_test
async def test_out_of_order_arrivals_leave_in_order_and_duplicates_are_dropped():
    out = Recorder()
    delivery = InOrderDelivery(out.sent.append, out.fetch, gap_repair_secs=5)
    delivery.set_baseline("pm:x", 4)
    for seq in (6, 7, 5, 5, 6, 3):
        delivery.offer("pm:x", seq, f"m{seq}")
    assert out.sent == ["m5", "m6", "m7"]
    assert out.fetches == []
    delivery.close()


@pytest.mark.gen_test
async def test_own_acks_advance_without_a_frame():
    out = Recorder()
    delivery = InOrderDelivery(out.sent.append, out.fetch, gap_repair_secs=5)
    delivery.offer("pm:x", 2, "m2")  # new pm conversation: waits for 1
    delivery.note_delivered("pm:x", 1)
    delivery.offer("pm:x", 1, "m1")
    assert out.sent == ["m2"]


@pytest.mark.gen_test
async def test_a_gap_that_does_not_close_is_read_back_from_the_database():
    out = Recorder(stored={2: "m2", 3: "m3"})
    delivery = InOrderDelivery(out.sent.append, out.fetch, gap_repair_secs=0.05)
    delivery.set_baseline("gm:g", 1)
    delivery.offer("gm:g", 4, "m4")
    assert out.sent == []
    await wait_until(lambda: len(out.sent) >= 3)  # the repair timer fired and the read-back is sent
    assert out.sent == ["m2", "m3", "m4"]
    assert out.fetches == [("gm:g", 1, 4)]


@pytest.mark.gen_test
async def test_a_gap_the_user_may_not_see_is_skipped_after_the_repair():
    out = Recorder(stored={})
    delivery = InOrderDelivery(out.sent.append, out.fetch, gap_repair_secs=0.05)
    delivery.set_baseline("gm:g", 1)
    delivery.offer("gm:g", 5, "m5")
    delivery.offer("gm:g", 6, "m6")
    assert out.sent == []
    await wait_until(lambda: out.fetches and len(out.sent) >= 2)  # repaired: nothing to read back
    assert out.fetches == [("gm:g", 1, 5)]
    assert out.sent == ["m5", "m6"]


@pytest.mark.gen_test
async def test_a_group_joined_since_connect_starts_at_its_first_message():
    out = Recorder()
    delivery = InOrderDelivery(out.sent.append, out.fetch, gap_repair_secs=5)
    delivery.offer("gm:new", 17, "m17")
    delivery.offer("gm:new", 18, "m18")
    assert out.sent == ["m17", "m18"]


@pytest.mark.gen_test
async def test_backlog_counts_messages_another_process_stored_before_their_summary(services, api):
    just_stored = JustStored()
    await api.send_pm("Rose", "Jack", "summarised")  # seq 1, summary written
    pm = ConversationRef.pm("Rose", "Jack")
    fresh = ConversationRef.pm("Lily", "Jack")  # no summary at all yet
    just_stored.note(pm, 2, ["Rose", "Jack"])
    just_stored.note(fresh, 1, ["Lily", "Jack"])
    plan = await services.inbox.backlog_plan("Jack", just_stored.for_user("Jack"))
    assert sorted((ref.key, received, newest) for ref, received, newest in plan) == sorted(
        [(pm.key, 0, 2), (fresh.key, 0, 1)]
    )
    assert just_stored.for_user("Eve") == {}
