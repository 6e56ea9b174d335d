"""Every query shape the server sends, in one place, checked with explain against nx-27017: each one
walks an index (SQLite's plan says SEARCH ... USING INDEX), none scans a collection on a hot path.

nx-27017 answers explain with SQLite's EXPLAIN QUERY PLAN of the filter (not the sort). What it
cannot index: `$or` (evaluated in Python over every document), `$in` on anything but `_id`, array
membership (`members`), and a partial index whose filter the query does not imply. The queries
below avoid those, or are listed in KNOWN_SCANS with why they are not on a hot path (or whose they
are to fix). A new query belongs in QUERY_SHAPES.
"""

from __future__ import annotations

import datetime

import pytest

NOW = datetime.datetime(2026, 11, 28, 6, 0, tzinfo=datetime.UTC)
MEDIA = {"content": "6b0a00000000000000000000", "contentType": {"$gte": 2, "$lte": 3}}

# (collection, filter, where the server sends it)
QUERY_SHAPES = [
    ("pm", {"conv": "c"}, "messages._next_seq (newest seq), sorted by seq"),
    ("pm", {"conv": "c", "seq": {"$gt": 1}}, "conversations.messages_after: backlog, gap repair"),
    ("pm", {"conv": "c", "seq": {"$gt": 1, "$lt": 9}}, "messages._page_of_conversation"),
    ("gm", {"conv": "c", "seq": {"$gt": 1, "$lte": 9}, "from": "u"}, "conversations.unread_counts (own seqs full)"),
    ("pm", {"conv": "c", "createdAt": {"$gte": NOW, "$lt": NOW}}, "GET /chats/pm since/until"),
    ("pm", {"conv": "c", "seq": {"$lt": 9}, "createdAt": {"$gte": NOW}}, "GET /chats/pm before + since"),
    ("pm", {"from": "u", "clientMsgId": "x"}, "messages._find_by_client_msg_id (a retried send)"),
    ("gm", {"from": "u", "clientMsgId": "x"}, "messages._find_by_client_msg_id (a retried send)"),
    ("pm", {"eventKey": "k"}, "messages._find_by_client_msg_id (a system event)"),
    ("pm", MEDIA, "files: who may read an attachment"),
    ("sm", {**MEDIA, "to": "u"}, "files: who may read an attachment"),
    ("conversations", {"_id": "pm:c"}, "conversations.get_summary, presence"),
    ("conversations", {"_id": "pm:c", "lastSeq": {"$lt": 3}}, "conversations.record_message"),
    ("conversations", {"_id": "pm:c", "lastSeq": {"$lte": 3}, "pendingA": "u"}, "conversations.clear_pending"),
    ("conversations", {"activityA": {"$gt": "u\x01", "$lt": "u\x02"}}, "conversations.find_recent (list)"),
    ("conversations", {"activityB": {"$gt": "u\x01", "$lt": "u\x02"}}, "conversations.find_recent (list)"),
    ("conversations", {"_id": {"$in": ["gm:g"]}, "activityAt": {"$lt": "z"}}, "conversations.find_recent (groups)"),
    ("conversations", {"_id": {"$in": ["gm:g"]}}, "conversations.get_last_seqs (backlog)"),
    ("conversations", {"pendingA": "u"}, "conversations.find_pending (backlog)"),
    ("conversations", {"pendingB": "u"}, "conversations.find_pending (backlog)"),
    ("cursors", {"user": "u"}, "conversations.get_cursors (backlog baselines)"),
    ("cursors", {"user": "u", "channel": "pm", "conv": "c"}, "conversations.move_cursor"),
    ("cursors", {"user": "u", "channel": "gm", "conv": "c"}, "conversations.record_own_message"),
    ("cursors", {"user": "u", "channel": "gm", "conv": {"$in": ["g"]}}, "conversations.get_group_cursors"),
    ("groups", {"_id": "g"}, "groups.find"),
    ("groups", {"_id": {"$in": ["g"]}, "members": {"$in": ["u"]}}, "files: a group attachment"),
    ("consultations", {"_id": "x"}, "consultations._get"),
    ("consultations", {"doctor": "d", "patient": "p", "status": "open"}, "consultations.start"),
    ("consultations", {"doctor": "d"}, "GET /consultations"),
    ("consultations", {"patient": "p"}, "GET /consultations"),
    ("presence", {"_id": "u"}, "presence"),
    ("instances", {"_id": {"$in": ["i"]}}, "presence"),
]

# Scans nx-27017 cannot avoid for these shapes, each with why it is tolerated or whose it is.
KNOWN_SCANS = [
    (
        "groups",
        {"members": {"$in": ["u"]}},
        "groups.ids_for_user / list_for_user (conversation list, backlog): array membership; nx has no "
        "multikey index. 28 ms for 300 groups of 1,000 (bench/RESULTS.md, issue 13); fix: membership "
        "documents keyed by user (models/groups.py, models/membership.py)",
    ),
    (
        "groups",
        {"$and": [{"members": {"$in": ["u"]}}, {"members": {"$in": ["v"]}}]},
        "presence.check_visible for a patient: as above",
    ),
    (
        "pm",
        {**MEDIA, "$or": [{"from": "u"}, {"to": "u"}]},
        "files: a pm attachment's reader ($or is evaluated in Python): models/files.py",
    ),
    (
        "pm",
        {"conv": {"$in": ["a", "b"]}, "_id": {"$gt": "x"}},
        "GET /chats/pm without peer (all of a user's pm messages): not a hot path; MongoDB walks conv",
    ),
    (
        "conversations",
        {"activityAt": {"$exists": False}, "lastSeq": {"$gt": 0}},
        "conversations.upgrade_summaries: once at start-up",
    ),
]


async def plan_of(db, collection: str, filter_: dict) -> list[str]:
    answer = await db.command("explain", {"find": collection, "filter": filter_})
    return [step["detail"] for step in answer["queryPlanner"]["winningPlan"]]


@pytest.mark.gen_test
@pytest.mark.parametrize("collection, filter_, where", QUERY_SHAPES, ids=[s[2] for s in QUERY_SHAPES])
async def test_query_walks_an_index(services, collection, filter_, where):
    plan = await plan_of(services.db, collection, filter_)
    assert plan and plan[0].startswith(f"SEARCH {collection} USING "), (where, plan)


@pytest.mark.gen_test
async def test_known_scans_are_still_the_only_ones(services):
    """If nx-27017 learns to index one of these, move it to QUERY_SHAPES."""
    for collection, filter_, why in KNOWN_SCANS:
        plan = await plan_of(services.db, collection, filter_)
        assert plan[0].startswith(f"SCAN {collection}"), (why, plan)


@pytest.mark.gen_test
async def test_issue_13_indexes_exist(services):
    summaries = await services.db.conversations.index_information()
    for name in ("activityA", "activityB", "pendingA", "pendingB"):
        assert f"idx_conversations_{name}" in summaries or any(
            info["key"] == [(name, 1)] for info in summaries.values()
        ), summaries
    messages = await services.db.pm.index_information()
    assert any(info["key"] == [("clientMsgId", 1)] for info in messages.values()), messages
