"""``observability.web: true``: a worker serves the status pages on its observability port, probes unchanged."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support import StartWorker, TopicSet, rc_worker, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_a_worker_serves_the_pages_beside_its_probes(
    topics: TopicSet, sqlite_url: str, start_worker: StartWorker, tmp_path: Path
) -> None:
    env = topics.env(sqlite_url, RC_WORKER_OBSERVABILITY__WEB="true", RC_WORKER_WEB__SAMPLE_INTERVAL_S="1")
    rc_worker("db", "upgrade", env=env)
    worker = start_worker(env, "w1")

    def listening() -> str:
        assert worker.alive(), (tmp_path / "w1.log").read_text()[-3000:]
        found = worker.events("observability_listening")
        return str(found[0]["url"]) if found else ""

    url = await wait_until(listening, timeout=60, interval=0.3, what="the observability endpoint")
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await wait_until(ready, timeout=60, interval=0.5, what="the worker to be ready")
        metrics = await client.get("/metrics")
        assert "rc_worker_records_consumed_total" in metrics.text
        status = (await client.get("/status")).json()
        assert status["readiness"]["ok"] is True
        assert status["group"] == topics.group_id
        assert len(status["partitions"]) == 6

        async def member_listed() -> bool:
            page = await client.get("/")
            return page.status_code == 200 and 'id="member-count">1<' in page.text

        await wait_until(member_listed, timeout=60, interval=1.0, what="the overview to list the worker")
        health = await client.get("/health")
        assert 'Readiness: <span class="ok">pass</span>' in health.text
    assert worker.terminate() == 0
