"""The status pages in a real headless Chromium, against the real broker, PostgreSQL and two workers.

Debian's chromium is driven by Playwright for Python; no browser is downloaded (never run
`playwright install`). Screenshots of every page, at a desktop and a phone width, are written
to artifacts/screenshots/ (kept by CI as artifacts; the folder is not committed).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import RC_WORKER, ROOT, StartWorker, TopicSet, make_events, rc_worker, store_for, unavailable, wait_until
from worker.config import KafkaSettings, PersistenceSettings, Settings
from worker.kafka import Outgoing, PartitionReader, Producer
from worker.persistence.admin import redrives
from worker.tools.offsets import survey

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
TOKEN = "web-test-token-7f3a"  # noqa: S105 - the test's own token
HOSTILE_TEXT = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2" id=pwned>'
HOSTILE_VALUE = b'<img src=x onerror="window.__xss=3" id=pwned2>\xff\xfe'
ODD_HEADER = ("x-odd<b>", b"\x00\xff<i>\x1b[31m")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A fresh headless Chromium context (its own user-data dir); fails in CI when chromium is missing."""
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - one stat before the browser starts
        unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install -e '.[dev]'")
    with tempfile.TemporaryDirectory(prefix="rc-web-chromium-") as profile:
        async with async_playwright() as driver:
            context = await driver.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, viewport={"width": 1280, "height": 900}
            )
            try:
                yield context
            finally:
                await context.close()


class WebProcess:
    """`rc-worker web` as a subprocess; its URL is read from what it prints."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.process = subprocess.Popen([*RC_WORKER, "web", "--port", "0"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = ""

    async def started(self) -> str:
        def printed() -> bool:
            assert self.process.poll() is None, f"rc-worker web exited:\n{self.log_path.read_text()[-3000:]}"
            found = re.search(r"serving the status pages at (http://\S+?)/", self.log_path.read_text())
            self.url = found.group(1) if found else ""
            return bool(found)

        await wait_until(printed, timeout=60, interval=0.2, what="rc-worker web to listen")
        return self.url

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def hostile_event(template: dict[str, Any]) -> bytes:
    event = json.loads(template["value"])
    event["id"] = "evt-hostile"
    event["data"]["id"] = "msg-hostile"
    event["data"]["text"] = HOSTILE_TEXT
    return json.dumps(event).encode()


async def screenshot(page: Any, name: str) -> None:
    """The page at each width, whole."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for label, (width, height) in WIDTHS.items():
        await page.set_viewport_size({"width": width, "height": height})
        await page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)
    await page.set_viewport_size({"width": 1280, "height": 900})


async def text_of(page: Any, selector: str) -> str:
    return str(await page.locator(selector).first.inner_text()).strip()


async def reload_until(page: Any, url: str, check: Any, what: str, within: float = 90) -> None:
    """Load ``url`` again and again until ``check(page)`` holds (the pages render the latest sample)."""

    async def holds() -> bool:
        await page.goto(url)
        return bool(await check(page))

    await wait_until(holds, timeout=within, interval=1.0, what=what)


async def offsets_table(page: Any) -> dict[int, dict[str, str]]:
    rows = await page.locator("#offsets tbody tr").all()
    table = {}
    for row in rows:
        cells = [c.strip() for c in await row.locator("td").all_inner_texts()]
        table[int(cells[0])] = {"committed": cells[1], "stored": cells[2], "end": cells[3], "lag": cells[4]}
    return table


async def partition_end(kafka: KafkaSettings, partition: int) -> int:
    async with PartitionReader(kafka, kafka.topic) as reader:
        return (await reader.bounds([partition]))[partition][1]


class TestStatusPages:
    async def test_pages_with_two_workers(
        self, topics: TopicSet, postgres_url: str, start_worker: StartWorker, browser: Any, tmp_path: Path
    ) -> None:
        env = topics.env(
            postgres_url,
            RC_WORKER_OBSERVABILITY__LAG_INTERVAL_S="1",
            RC_WORKER_WEB__SAMPLE_INTERVAL_S="1",
            RC_WORKER_WEB__TOKEN=TOKEN,
        )
        settings = Settings(kafka=topics.kafka_settings(), persistence=PersistenceSettings(url=postgres_url))  # type: ignore[arg-type]
        kafka = settings.kafka
        events_file = tmp_path / "events.jsonl"
        make_events(events_file, count=60, rooms=4, seed=11)
        template = json.loads(events_file.read_text().splitlines()[0])
        rc_worker("db", "upgrade", env=env)
        rc_worker("load", str(events_file), env=env)
        async with Producer(kafka) as producer:
            hostile_partition = await producer.partition_for(kafka.topic, template["key"].encode(), 0)
            await producer.send_many(
                [
                    Outgoing(
                        kafka.topic,
                        template["key"].encode(),
                        hostile_event(template),
                        (("content-type", b"application/cloudevents+json"), ODD_HEADER),
                    ),
                    Outgoing(kafka.topic, b"bad-1", HOSTILE_VALUE, (ODD_HEADER,)),
                    Outgoing(kafka.topic, b"bad-2", b"{this is not json", ()),
                ]
            )
        produced = 60 + 3
        web = WebProcess(env, tmp_path / "web.log")
        page = await browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), asyncio.ensure_future(dialog.dismiss())))
        try:
            url = await web.started()

            # Before any worker: no member, and everything produced is lag.
            async def all_lag(p: Any) -> bool:
                return await text_of(p, "#total-lag") == str(produced) and await text_of(p, "#member-count") == "0"

            await reload_until(page, url + "/", all_lag, "the overview to show all records as lag and no member")

            workers = [start_worker(env, "w1"), start_worker(env, "w2")]

            async def caught_up() -> bool:
                assert all(w.alive() for w in workers), "a worker exited"
                rows = await survey(settings)
                return sum(r.end for r in rows) == produced and all(r.lag == 0 for r in rows)

            await wait_until(caught_up, timeout=120, interval=1.0, what="both workers to process everything")

            # The overview: both members, the right lag, every partition owned.
            async def both_members(p: Any) -> bool:
                if await text_of(p, "#member-count") != "2" or await text_of(p, "#total-lag") != "0":
                    return False
                ready = await p.locator("#members tbody tr").all_inner_texts()
                return len(ready) == 2 and all("ready" in row and "not ready" not in row for row in ready)

            await reload_until(page, url + "/", both_members, "the overview to show two ready members and no lag")
            expected = {row.partition: row for row in await survey(settings)}
            table = await offsets_table(page)
            assert sorted(table) == sorted(expected)
            for partition, row in expected.items():
                assert table[partition]["end"] == str(row.end)
                assert table[partition]["committed"] == str(row.committed if row.committed is not None else "-")
                assert table[partition]["lag"] == str(row.lag)
            members = await page.locator("#members tbody tr td:nth-child(3)").all_inner_texts()
            owned = sorted(int(p) for cell in members for p in cell.replace(",", " ").split() if p.isdigit())
            assert owned == sorted(expected), f"members hold {owned}"
            await screenshot(page, "overview")

            # Dead letters appear with their reasons; hostile values and headers show as text.
            async def two_letters(p: Any) -> bool:
                return await text_of(p, "#dlq-total") == "2"

            await reload_until(page, url + "/dead-letters", two_letters, "both dead letters to be listed")
            body = await page.locator("main").inner_text()
            assert "is not valid UTF-8" in body
            assert "not JSON" in body or "not valid JSON" in body
            for details in await page.locator("details").all():
                await details.locator("summary").click()
            assert await page.locator("#pwned, #pwned2").count() == 0
            shown = await page.locator("main").inner_text()
            assert '<img src=x onerror="window.__xss=3" id=pwned2>\\xff\\xfe' in shown
            assert "x-odd<b>" in shown
            assert "\\x00\\xff<i>\\x1b[31m" in shown
            await screenshot(page, "dead-letters")
            utf8_letter = page.locator("article.letter", has_text="is not valid UTF-8")
            letter_id = await utf8_letter.get_attribute("id")
            assert letter_id is not None
            _, dlq_partition, dlq_offset = letter_id.split("-")
            original = re.search(r"(\d+)/(\d+) at", await utf8_letter.locator("dd").nth(1).inner_text())
            assert original is not None
            original_partition = int(original.group(1))
            end_before = await partition_end(kafka, original_partition)

            # Without the token: refused, and nothing is re-driven.
            await utf8_letter.locator("input[name=token]").fill("not-the-token")
            await utf8_letter.locator("button").click()
            assert "wrong or missing token" in await text_of(page, "#refused")
            no_token = await page.request.post(
                url + "/dead-letters/redrive", form={"position": f"{dlq_partition}/{dlq_offset}", "confirm": "yes"}
            )
            assert no_token.status == 403
            async with store_for(postgres_url) as store:
                assert await redrives(store, kafka.dead_letter_topic) == {}
            assert await partition_end(kafka, original_partition) == end_before

            # With the token: a dry-run count first, then the re-drive, recorded in the ledger.
            await page.goto(url + "/dead-letters")
            utf8_letter = page.locator(f"#{letter_id}")
            await utf8_letter.locator("input[name=token]").fill(TOKEN)
            await utf8_letter.locator("button").click()
            assert await text_of(page, "#would-send") == "1"
            await screenshot(page, "redrive-dry-run")
            await page.locator("#redrive-confirm input[name=token]").fill(TOKEN)
            await page.locator("#redrive-confirm button").click()
            assert await text_of(page, "#sent") == "1"
            assert await partition_end(kafka, original_partition) == end_before + 1
            async with store_for(postgres_url) as store:
                ledger = await redrives(store, kafka.dead_letter_topic)
            assert list(ledger) == [(int(dlq_partition), int(dlq_offset))]
            assert ledger[(int(dlq_partition), int(dlq_offset))].sent_at is not None
            await page.goto(url + "/dead-letters")
            assert "re-driven to topic:" in await page.locator(f"#{letter_id}").inner_text()
            assert await page.locator(f"#{letter_id} form").count() == 0

            # Never twice: the same dead letter again is skipped.
            again = await page.request.post(
                url + "/dead-letters/redrive", form={"position": f"{dlq_partition}/{dlq_offset}", "token": TOKEN, "confirm": "yes"}
            )
            assert again.status == 403  # no CSRF token in a bare request
            await page.goto(url + "/dead-letters?reason=UTF-8")
            await page.locator("#redrive-filter input[name=token]").fill(TOKEN)
            await page.locator("#redrive-filter button").click()
            assert await text_of(page, "#skipped") == "1"

            async def count_updated(p: Any) -> bool:
                return "1 re-driven" in await p.locator(".cards").inner_text()

            await reload_until(page, url + "/", count_updated, "the overview to count the re-driven dead letter")

            # The topic explorer: the hostile message shows as text, decoded as the worker decodes it.
            await page.goto(f"{url}/explorer?partition={hostile_partition}")
            hostile = page.locator("article.record", has_text="window.__xss=1")
            assert await hostile.count() == 1
            assert HOSTILE_TEXT in await hostile.locator(".message-text").inner_text()
            await page.goto(f"{url}/explorer?partition={original_partition}")
            assert "value is not valid UTF-8" in await page.locator("main").inner_text()
            assert await page.locator("#pwned, #pwned2").count() == 0
            await screenshot(page, "explorer")

            # Partitions, state and health.
            await page.goto(url + "/partitions")
            owners = await page.locator("#partitions tbody tr td:nth-child(2)").all_inner_texts()
            assert len(owners) == len(expected)
            assert all(owner.strip() and owner.strip() != "unassigned" for owner in owners)
            assert (await page.locator("#partitions tbody tr", has_text="running").count()) == len(expected)
            await screenshot(page, "partitions")
            await page.goto(url + "/state?app=message-count&association=misc%3Amessage-count")
            assert await page.locator("#records tbody tr").count() == 1
            await page.goto(url + "/state")
            assert await page.locator("#records tbody tr").count() > 1
            await screenshot(page, "state")
            await page.goto(url + "/health")
            assert await page.locator("section.member").count() == 2
            assert await page.locator("section.member h3", has_text="Readiness: pass").count() == 2
            await screenshot(page, "health")

            assert dialogs == []
            assert await page.evaluate("typeof window.__xss") == "undefined"
        finally:
            web.stop()
