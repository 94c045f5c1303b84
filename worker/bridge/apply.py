"""``rc-worker apply``: read ``kafka.commands_topic`` as a consumer group of its own and carry each command to Rocket.Chat.

Each assigned partition is applied in offset order by a lane of its own, paused in Kafka
while the lane works, so a partition that waits (a 429's Retry-After, a 5xx, an unreachable
server) holds up only itself. A command's offset is committed after its effect; a command
Rocket.Chat refuses for good (a 4xx other than 408 and 429) or that is not a command goes to
the dead-letter topic with ``rc-dlq-*`` headers, then its offset is committed. Killed at any
point, the commands after the last commit are applied again, which changes nothing twice
(see ``worker.bridge.commands``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from collections.abc import Iterable

import structlog

from worker import constants
from worker.apps.readers import Directory
from worker.bridge.commands import apply, parse
from worker.config import Settings
from worker.errors import BrokerError, ConfigError, DecodeError, RocketChatError
from worker.events import RawRecord
from worker.kafka import Consumer, Outgoing, Producer
from worker.pipeline.dead_letters import dead_letter
from worker.rocketchat.client import RocketChatClient

log = structlog.get_logger("worker.apply")


def dead_letter_topic_of(settings: Settings) -> str:
    """Where apply dead-letters commands: ``rocketchat.dead_letter_topic``, else ``<kafka.commands_topic>.dlq``."""
    return settings.rocketchat.dead_letter_topic or f"{settings.kafka.commands_topic}.dlq"


class Applier:
    """One member of the apply group."""

    def __init__(self, settings: Settings, client: RocketChatClient | None = None) -> None:
        kafka = settings.kafka
        self.settings = settings.rocketchat
        self.topic = kafka.commands_topic
        self.dead_letter_topic = dead_letter_topic_of(settings)
        self.consumer = Consumer(kafka.model_copy(update={"topic": self.topic}), group_id=settings.rocketchat.apply_group_id)
        self.producer = Producer(kafka)
        self.client = client or RocketChatClient(settings.rocketchat)
        # Usernames of notified user ids, cached for every command this member applies.
        self.users = Directory(self.client, app_user_id=settings.rocketchat.user_id)
        self.fetch_timeout_ms = kafka.fetch_timeout_ms
        self.max_records = kafka.max_batch_records
        self.lanes: dict[int, asyncio.Task[None]] = {}
        self.stopping = asyncio.Event()
        self.tally = {"applied": 0, "dead_lettered": 0, "retried": 0}

    def stop(self) -> None:
        """Finish: the loop ends, lanes are cancelled (their commands are applied again by the next owner)."""
        self.stopping.set()

    async def run(self) -> None:
        """Apply commands until :meth:`stop`; a lane's failure ends the run with it."""
        async with self.producer, self.client:
            await self.consumer.start(self._revoked, self._assigned)
            log.info("apply_started", topic=self.topic, group=self.settings.apply_group_id, dead_letter_topic=self.dead_letter_topic)
            try:
                while not self.stopping.is_set():
                    self._raise_failed_lanes()
                    batches = await self.consumer.fetch(self.fetch_timeout_ms, self.max_records)
                    for partition, records in batches.items():
                        self.consumer.pause(partition)
                        self.lanes[partition] = asyncio.create_task(self._lane(partition, records), name=f"apply-lane-{partition}")
            finally:
                await self._cancel(list(self.lanes))
                await self.consumer.stop()
                log.info("apply_stopped", **self.tally)

    def _raise_failed_lanes(self) -> None:
        for partition, task in list(self.lanes.items()):
            if task.done():
                del self.lanes[partition]
                task.result()  # a lane's error (the broker, a commit) ends the run: restart resumes from the commit

    async def _lane(self, partition: int, records: list[RawRecord]) -> None:
        for record in records:
            await self._apply_one(record)
            await self._commit(partition, record.offset + 1)
        if partition in self.consumer.assignment():
            self.consumer.resume(partition)

    async def _commit(self, partition: int, offset: int) -> None:
        """Commit after the effect; a broker blip is waited out here rather than ending the run."""
        for attempt in range(1, constants.APPLY_COMMIT_ATTEMPTS + 1):
            try:
                await self.consumer.commit({partition: offset})
                return
            except BrokerError as exc:
                if attempt == constants.APPLY_COMMIT_ATTEMPTS:
                    raise
                wait = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2 ** (attempt - 1))
                log.warning("apply_commit_retry", partition=partition, offset=offset, attempt=attempt, error=str(exc), wait_s=wait)
                await asyncio.sleep(wait)

    async def _apply_one(self, record: RawRecord) -> None:
        attempt = 0
        while True:
            try:
                command = parse(record.value)
                outcome = await apply(self.client, command, self.users)
            except DecodeError as exc:
                await self._dead_letter(record, exc.reason, "DecodeError")
                return
            except RocketChatError as exc:
                if not exc.retriable:
                    await self._dead_letter(record, str(exc), "RocketChatError")
                    return
                attempt += 1
                wait = self._wait(exc, attempt)
                self.tally["retried"] += 1
                log.info("command_retry", partition=record.partition, offset=record.offset, status=exc.status, attempt=attempt, wait_s=wait)
                await asyncio.sleep(wait)
                continue
            self.tally["applied"] += 1
            log.info("command_applied", partition=record.partition, offset=record.offset, command_id=command.id, outcome=outcome)
            return

    def _wait(self, exc: RocketChatError, attempt: int) -> float:
        if exc.retry_after is not None:
            return exc.retry_after  # the server said when: sooner only earns another 429
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography

    async def _dead_letter(self, record: RawRecord, reason: str, error_type: str) -> None:
        letter = dead_letter(record, self.dead_letter_topic, reason, stage="apply", error_type=error_type)
        await self.producer.send_many([Outgoing(letter.topic, letter.key, letter.value, letter.headers)])
        self.tally["dead_lettered"] += 1
        log.warning("command_dead_lettered", partition=record.partition, offset=record.offset, reason=reason, error_type=error_type)

    async def _revoked(self, partitions: set[int]) -> None:
        await self._cancel(partitions)

    async def _assigned(self, partitions: set[int]) -> None:
        log.info("apply_partitions_assigned", partitions=sorted(partitions))

    async def _cancel(self, partitions: Iterable[int]) -> None:
        tasks = [self.lanes.pop(p) for p in list(partitions) if p in self.lanes]
        for task in tasks:
            task.cancel()
        # A cancelled lane's command may have reached Rocket.Chat: its next owner repeats it, harmlessly.
        await asyncio.gather(*tasks, return_exceptions=True)


async def apply_command(settings: Settings, _args: argparse.Namespace) -> int:
    """``rc-worker apply``: apply commands until SIGTERM/SIGINT.

    Raises:
        ConfigError: ``rocketchat.user_id`` or ``rocketchat.auth_token`` is not set.

    """
    if not settings.rocketchat.user_id or not settings.rocketchat.auth_token.get_secret_value():
        raise ConfigError("rocketchat.user_id and rocketchat.auth_token must be set (RC_WORKER_ROCKETCHAT__AUTH_TOKEN)")
    applier = Applier(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, applier.stop)
    await applier.run()
    return 0
