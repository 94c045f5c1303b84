"""The status pages without a browser: rendering, escaping, paging, and the guard of the re-drive.

The app runs in Starlette's test client over a real store (SQLite, then PostgreSQL); the
background sampling is off and the sample is set by hand, so nothing here needs Kafka.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import insert

from worker.config import Settings, WebSettings
from worker.events import RawRecord
from worker.kafka import GroupMember
from worker.persistence.admin import redrives
from worker.persistence.browse import app_ids, outbox_backlog_by_topic, records_page
from worker.persistence.schema import dlq_redrives, outbox, record_associations, records
from worker.persistence.store import Store
from worker.tools.dlq import DeadLetter
from worker.tools.offsets import PartitionOffsets
from worker.web.app import create_app
from worker.web.display import pretty, printable
from worker.web.live import Live, MemberView, Sample
from worker.web.security import CSRF_COOKIE, Guard, Refused

HOSTILE = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2" id=pwned>'


async def fill(store: Store, app: str, count: int, association: str = "room:GENERAL") -> None:
    """``count`` records r00000.. of ``app``; every third has ``association``, all have misc:all."""
    rows, links = [], []
    for n in range(count):
        record_id = f"r{n:05d}"
        associations = ["misc:all", association] if n % 3 == 0 else ["misc:all"]
        rows.append(
            {
                "app_id": app,
                "id": record_id,
                "data": json.dumps({"n": n, "text": HOSTILE}),
                "version": 1,
                "associations": json.dumps(associations),
            }
        )
        links += [{"app_id": app, "association": a, "record_id": record_id} for a in associations]
    async with store.engine.begin() as conn:
        await conn.execute(insert(records), rows)
        await conn.execute(insert(record_associations), links)


def letter(partition: int, offset: int, reason: str, app: str | None = None) -> DeadLetter:
    original = RawRecord(
        "events", 2, 40 + offset, 1_764_000_000_000, b"key\x00\xff", HOSTILE.encode() + b"\xff\xfe", (("x-odd\x01<b>", b"\x00\xff<i>"),)
    )
    return DeadLetter(partition, offset, app, "decode", reason, original)


@pytest.fixture
async def client_for(store: Store) -> AsyncIterator[object]:
    clients: list[httpx.AsyncClient] = []

    def make(token: str | None = None) -> tuple[httpx.AsyncClient, Live]:
        settings = Settings(web=WebSettings(token=SecretStr(token) if token else None))
        live = Live(settings, store)
        app = create_app(settings, store, live, run_live=False)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        clients.append(client)
        return client, live

    yield make
    for client in clients:
        await client.aclose()


async def form_token(client: httpx.AsyncClient, path: str = "/dead-letters") -> str:
    page = await client.get(path)
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, "the page carries no CSRF token"
    return found.group(1)


# -- display ---------------------------------------------------------------------------------


def test_printable_shows_odd_bytes_and_controls_as_escapes() -> None:
    assert printable(b"ok \xff\x00\x1b[31m \xe2\x80\xa8") == "ok \\xff\\x00\\x1b[31m \\u2028"
    assert printable("tab\tand\nnewline") == "tab\tand\nnewline"


def test_pretty_indents_json_and_leaves_other_bytes_printable() -> None:
    assert pretty(b'{"a":[1,2]}') == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert pretty(b"{not json \xff") == "{not json \\xff"


# -- the guard -------------------------------------------------------------------------------


def test_guard_refuses_everything_without_a_configured_token() -> None:
    guard = Guard(None)
    cookie = guard.new_cookie()
    with pytest.raises(Refused, match="read-only"):
        guard.check(cookie, guard.form_token(cookie), "anything")


def test_guard_needs_the_signed_cookie_and_the_token() -> None:
    guard = Guard(SecretStr("s3cret"))
    cookie = guard.new_cookie()
    guard.check(cookie, guard.form_token(cookie), "s3cret")
    with pytest.raises(Refused, match="CSRF token is missing"):
        guard.check(None, guard.form_token(cookie), "s3cret")
    with pytest.raises(Refused, match="does not match"):
        guard.check(guard.new_cookie(), guard.form_token(cookie), "s3cret")
    with pytest.raises(Refused, match="invalid or expired"):
        guard.check(cookie, Guard(SecretStr("s3cret")).form_token(cookie), "s3cret")  # another process's key
    with pytest.raises(Refused, match="wrong or missing token"):
        guard.check(cookie, guard.form_token(cookie), "s3cre")


# -- pages -----------------------------------------------------------------------------------


async def test_every_page_renders_read_only_and_with_security_headers(client_for) -> None:
    client, _ = client_for()
    for path in ("/", "/partitions", "/dead-letters", "/state", "/health"):
        page = await client.get(path)
        assert page.status_code == 200, path
        assert 'id="read-only"' in page.text, path
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
    assert CSRF_COOKIE in client.cookies


async def test_without_a_token_no_redrive_form_is_offered_and_a_post_is_refused(client_for) -> None:
    client, live = client_for()
    live.dead_letters.newest_first = [letter(0, 1, "value is not JSON")]
    page = await client.get("/dead-letters")
    assert "value is not JSON" in page.text
    assert 'action="/dead-letters/redrive"' not in page.text
    refused = await client.post("/dead-letters/redrive", data={"csrf": "x", "token": "x", "position": "0/1"})
    assert refused.status_code == 403
    assert "read-only" in refused.text


async def test_a_post_without_the_csrf_token_or_with_a_wrong_token_is_refused(client_for) -> None:
    client, live = client_for(token="s3cret")  # noqa: S106 - the test's own token
    live.dead_letters.newest_first = [letter(0, 1, "value is not JSON")]
    csrf = await form_token(client)
    missing = await client.post("/dead-letters/redrive", data={"token": "s3cret", "position": "0/1"})
    assert missing.status_code == 403
    assert "CSRF" in missing.text
    wrong = await client.post("/dead-letters/redrive", data={"csrf": csrf, "token": "guess", "position": "0/1"})
    assert wrong.status_code == 403
    assert "wrong or missing token" in wrong.text
    assert "s3cret" not in wrong.text


async def test_dead_letters_are_escaped_filtered_and_paged(client_for) -> None:
    client, live = client_for()
    letters = [letter(0, n, "value is not JSON" if n % 2 else "handler failed", app=None if n % 2 else "mentions") for n in range(120)]
    live.dead_letters.newest_first = letters
    page = await client.get("/dead-letters", params={"reason": "not json"})
    assert re.search(r'id="dlq-total">60<', page.text)
    assert "page 1 of 2" in page.text
    assert "<script>" not in page.text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page.text
    assert "\\xff\\xfe" in page.text  # invalid UTF-8 of the value, as escapes
    assert "x-odd\\x01&lt;b&gt;" in page.text  # a header name with a control character and markup
    assert "\\x00\\xff&lt;i&gt;" in page.text
    by_app = await client.get("/dead-letters", params={"app": "mentions"})
    assert re.search(r'id="dlq-total">60<', by_app.text)
    assert "handler failed" in by_app.text
    assert "value is not JSON</span>" not in by_app.text


def shown_letters(page: str) -> list[str]:
    """The positions (``P-O``) of the dead letters a page shows, in order."""
    return re.findall(r'<article class="letter" id="dl-(\d+-\d+)"', page)


def ledger_statuses(page: str) -> dict[str, str]:
    """Per shown dead letter (``P-O``) that the ledger has, what the page says of it."""
    found = {}
    for article in page.split('<article class="letter" ')[1:]:
        position = re.match(r'id="dl-(\d+-\d+)"', article)
        status = re.search(r'<span class="tag[^"]*status">([^<]+)</span>', article)
        if position and status:
            found[position.group(1)] = status.group(1)
    return found


async def claim(store: Store, dlq_topic: str, positions: list[tuple[int, int]], *, sent: bool = True) -> None:
    """Rows in the redrive ledger, as ``rc-worker dlq redrive`` writes them."""
    now = datetime.now(UTC)
    rows = [
        {
            "dlq_topic": dlq_topic,
            "dlq_partition": p,
            "dlq_offset": o,
            "target": "topic:events",
            "redriven_at": now,
            "sent_at": now if sent else None,
        }
        for p, o in positions
    ]
    async with store.engine.begin() as conn:
        await conn.execute(insert(dlq_redrives), rows)


async def test_dead_letters_show_the_newest_page_and_the_older_link_pages_on(client_for) -> None:
    client, live = client_for()
    live.dead_letters.newest_first = [letter(n % 3, n, "value is not JSON") for n in range(120)]
    first = await client.get("/dead-letters")
    assert shown_letters(first.text) == [f"{n % 3}-{n}" for n in range(50)]
    assert "page 1 of 3" in first.text
    assert ">newer</a>" not in first.text
    older = re.search(r'<a href="([^"]+)">older</a>', first.text)
    assert older, "the first page links to no older page"
    second = await client.get("/dead-letters" + older.group(1).replace("&amp;", "&"))
    assert shown_letters(second.text) == [f"{n % 3}-{n}" for n in range(50, 100)]
    last = await client.get("/dead-letters", params={"page": 3})
    assert shown_letters(last.text) == [f"{n % 3}-{n}" for n in range(100, 120)]
    assert ">older</a>" not in last.text


async def test_dead_letter_filters_hold_across_pages(client_for) -> None:
    client, live = client_for()
    live.dead_letters.newest_first = [
        letter(0, n, "handler failed: boom" if n % 2 else "value is not JSON", app="mentions" if n % 4 == 1 else None) for n in range(240)
    ]
    first = await client.get("/dead-letters", params={"app": "mentions", "reason": "BOOM"})
    assert re.search(r'id="dlq-total">60<', first.text)
    assert shown_letters(first.text) == [f"0-{n}" for n in range(1, 200, 4)]
    older = re.search(r'<a href="([^"]+)">older</a>', first.text)
    assert older
    assert "app=mentions" in older.group(1)
    assert "reason=BOOM" in older.group(1)
    second = await client.get("/dead-letters" + older.group(1).replace("&amp;", "&"))
    assert shown_letters(second.text) == [f"0-{n}" for n in range(201, 240, 4)]
    worker_own = await client.get("/dead-letters", params={"app": "(worker)", "reason": "not json"})
    assert re.search(r'id="dlq-total">120<', worker_own.text)


async def test_dead_letters_show_the_ledger_of_their_page_and_count_what_is_left(client_for, store: Store) -> None:
    client, live = client_for()
    topic = live.settings.kafka.dead_letter_topic
    live.dead_letters.newest_first = [letter(0, n, "value is not JSON") for n in range(120)]
    await claim(store, topic, [(0, 3), (0, 70)])
    await claim(store, topic, [(0, 4)], sent=False)
    await claim(store, "another.dlq", [(0, 5)])
    await live.ledger.refresh()
    page = await client.get("/dead-letters")
    assert re.search(r'id="dlq-pending">117<', page.text)
    assert ledger_statuses(page.text) == {"0-3": "re-driven to topic:events", "0-4": "claimed, not sent to topic:events"}
    second = await client.get("/dead-letters", params={"page": 2})
    assert ledger_statuses(second.text) == {"0-70": "re-driven to topic:events"}
    overview = await client.get("/")
    assert live.ledger.size.sent == 2
    assert '<div class="muted">2 re-driven</div>' in overview.text


async def test_the_sampler_reads_the_ledger_of_the_letters_held_only(client_for, store: Store) -> None:
    _, live = client_for()
    topic = live.settings.kafka.dead_letter_topic
    live.dead_letters.newest_first = [letter(0, n, "x") for n in range(109, 99, -1)] + [letter(1, n, "x") for n in range(9, 4, -1)]
    assert live.dead_letters.spans == {0: (100, 109), 1: (5, 9)}
    # Rows of letters the topic has dropped (below the first held), past the last held, and of a partition none is held of.
    await claim(store, topic, [(0, 50), (0, 100), (0, 110), (1, 2), (1, 7), (2, 0)])
    await live.ledger.refresh()
    assert live.ledger.claimed == {(0, 100), (1, 7)}
    assert live.ledger.size.claimed == 2
    await claim(store, topic, [(0, 105)], sent=False)
    await live.ledger.refresh()
    assert live.ledger.claimed == {(0, 100), (0, 105), (1, 7)}
    assert (live.ledger.size.claimed, live.ledger.size.sent) == (3, 2)


async def test_the_ledger_is_read_for_the_asked_positions_only(store: Store) -> None:
    await claim(store, "t.dlq", [(0, n) for n in range(2_500)] + [(1, 7)])
    found = await redrives(store, "t.dlq", [(0, 10), (1, 7), (0, 2_499), (2, 1), (0, 10)])
    assert sorted(found) == [(0, 10), (0, 2_499), (1, 7)]
    assert len(await redrives(store, "t.dlq", [(0, n) for n in range(0, 2_500, 2)])) == 1_250  # over more than one chunk
    assert len(await redrives(store, "t.dlq")) == 2_501


async def test_the_outbox_backlog_counts_unpublished_rows_per_topic(store: Store) -> None:
    now = datetime.now(UTC)

    def row(topic: str, published: bool) -> dict[str, object]:
        return {"topic": topic, "value": b"{}", "headers": "[]", "created_at": now, "published_at": now if published else None}

    rows = [row("cmd", True)] * 30 + [row("cmd", False)] * 3 + [row("events.dlq", False)] * 2 + [row("other", True)] * 5
    async with store.engine.begin() as conn:
        await conn.execute(insert(outbox), rows)
    assert await outbox_backlog_by_topic(store) == {"cmd": 3, "events.dlq": 2}


async def test_overview_shows_members_lag_and_counters_from_the_sample(client_for) -> None:
    client, live = client_for()
    member = GroupMember("m-1", "rc-worker", "10.0.0.7", (0, 1))
    status = {
        "readiness": {"ok": True, "detail": {}},
        "liveness": {"ok": True, "detail": {}},
        "apps": {"mentions": {"conflicts": 3, "retries": 2}},
    }
    live.sample = Sample(
        datetime.now(UTC),
        [PartitionOffsets(0, 0, 100, 90, 95), PartitionOffsets(1, 0, 50, None, None)],
        "Stable",
        [MemberView(member, None, status)],
    )
    page = await client.get("/")
    assert 'id="group-state">Stable<' in page.text
    assert 'id="member-count">1<' in page.text
    assert 'id="total-lag">55<' in page.text  # 100 - max(90, 95) + 50 - 0
    assert "10.0.0.7" in page.text
    assert re.search(r"<td>mentions</td><td[^>]*>0</td><td[^>]*>3</td><td[^>]*>2</td>", page.text)


async def test_state_pages_by_id_and_by_association(store: Store) -> None:
    await fill(store, "message-count", 130)
    first = await records_page(store, "message-count", None, None, 50)
    assert [r.id for r in first.records] == [f"r{n:05d}" for n in range(50)]
    assert first.next_after == "r00049"
    last = await records_page(store, "message-count", None, "r00099", 50)
    assert len(last.records) == 30
    assert last.next_after is None
    room = await records_page(store, "message-count", "room:GENERAL", None, 20)
    assert [r.id for r in room.records] == [f"r{n:05d}" for n in range(0, 60, 3)]
    more = await records_page(store, "message-count", "room:GENERAL", room.next_after, 50)
    assert [r.id for r in more.records] == [f"r{n:05d}" for n in range(60, 130, 3)]
    assert more.next_after is None
    assert await app_ids(store) == ["message-count"]


async def test_state_page_escapes_record_data(client_for, store: Store) -> None:
    await fill(store, "message-count", 5)
    client, _ = client_for()
    page = await client.get("/state", params={"app": "message-count", "association": "room:GENERAL"})
    assert page.status_code == 200
    assert page.text.count("<tr><td><code>r000") == 2  # r00000 and r00003
    assert "<img src=x" not in page.text
    assert "&lt;img src=x onerror=" in page.text


async def test_member_rows_are_renewed_listed_while_recent_and_deleted_on_leave(store: Store) -> None:
    from datetime import timedelta

    from worker.persistence.members import Member, heartbeat, leave, recent

    now = datetime.now(UTC)
    one = Member("host:1:a", "g", "t", "host", "m-1", "http://127.0.0.1:9464", now, now)
    gone = Member("host:2:b", "g", "t", "host", None, None, now - timedelta(hours=3), now - timedelta(hours=2))
    await heartbeat(store, gone)
    await heartbeat(store, one)  # prunes the group's rows older than an hour
    await heartbeat(store, Member("host:1:a", "g", "t", "host", "m-1b", "http://127.0.0.1:9465", now, now))
    found = await recent(store, "g", "t", 30.0)
    assert [(m.member, m.kafka_member_id, m.url) for m in found] == [("host:1:a", "m-1b", "http://127.0.0.1:9465")]
    assert await recent(store, "g", "other-topic", 30.0) == []
    await leave(store, "host:1:a")
    assert await recent(store, "g", "t", 30.0) == []


async def test_partitions_show_owner_claim_offsets_and_a_retrying_lane_with_its_error(client_for, store: Store) -> None:
    await store.claim("rc-apps-worker", "rocketchat.message.sent", [0, 1], "host-a:11:abc")
    client, live = client_for()
    lanes = [
        {
            "partition": 0,
            "paused": True,
            "retrying": True,
            "attempt": 4,
            "last_error": "PersistenceError: <b>db</b> down",
            "last_error_at": None,
        },
        {"partition": 1, "paused": False, "retrying": False, "attempt": 0, "last_error": None, "last_error_at": None},
    ]
    member = MemberView(GroupMember("m-1", "rc-worker", "10.0.0.7", (0, 1)), None, {"partitions": lanes})
    live.sample = Sample(datetime.now(UTC), [PartitionOffsets(0, 0, 10, 4, 6), PartitionOffsets(1, 0, 3, 3, 3)], "Stable", [member])
    page = (await client.get("/partitions")).text
    rows = re.findall(r'<tr data-partition="(\d)">(.*?)</tr>', page, re.DOTALL)
    assert [p for p, _ in rows] == ["0", "1"]
    first, second = rows[0][1], rows[1][1]
    assert "host-a:11:abc (1)" in first
    assert "retrying (attempt 4)" in first
    assert "PersistenceError: &lt;b&gt;db&lt;/b&gt; down" in first
    assert re.search(r">4</td>\s*<td class=\"num differs\">6</td>", first)  # stored ahead of committed
    assert "running" in second
