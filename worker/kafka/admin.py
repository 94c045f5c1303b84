"""Kafka administration: topics (create, describe, size limits) and consumer groups (describe, read and set their offsets)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import (
    TopicAlreadyExistsError,
)

from worker import constants
from worker.config import KafkaSettings
from worker.errors import BrokerError
from worker.kafka.client import client_options, start_bounded, translate

log = structlog.get_logger("worker.kafka")


@contextlib.asynccontextmanager
async def admin(settings: KafkaSettings, timeout_s: float | None = None) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client for the duration of the block, started within ``timeout_s`` (None: aiokafka's own limits)."""
    client = AIOKafkaAdminClient(**client_options(settings))
    await start_bounded(client, settings.bootstrap_servers, timeout_s)
    try:
        yield client
    finally:
        await client.close()


async def max_message_bytes(client: AIOKafkaAdminClient, topic: str | None) -> int | None:
    """``topic``'s effective max.message.bytes, or (``None``) the broker's default; None if the cluster does not say."""
    if topic is None:
        with translate("describing the cluster"):
            brokers = (await client.describe_cluster())["brokers"]
        if not brokers:
            return None
        resource = ConfigResource(ConfigResourceType.BROKER, str(brokers[0]["node_id"]), configs={"message.max.bytes": None})
    else:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": None})
    with translate(f"reading the configuration of {topic or 'the broker'}"):
        responses = await client.describe_configs([resource])
    for response in responses:
        for error_code, _message, _type, _name, entries in response.resources:
            for name, value, *_ in entries if not error_code else ():
                if name in ("max.message.bytes", "message.max.bytes") and value:
                    return int(value)
    return None


async def create_topics(settings: KafkaSettings, partitions: int, replication: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """Create the event topic (``partitions`` partitions), the DLQ and commands topics, and ``extra`` ones, if missing.

    ``extra`` topics (apply's dead letters) are made like the commands topic.

    The dead-letter topic takes the event topic's max.message.bytes plus
    ``RECORD_HEADROOM_BYTES``, so any record the event topic holds can be dead-lettered whole
    with its rc-dlq-* headers. (Commands need nothing special: ``MAX_COMMAND_BYTES`` is well
    within Kafka's default.)
    """
    created = []
    async with admin(settings) as client:
        existing = set(await client.list_topics())
        # A new event topic gets the broker's default; an existing one may have its own.
        event_limit = await max_message_bytes(client, settings.topic if settings.topic in existing else None)
        dead_letter_limit = (event_limit or constants.KAFKA_DEFAULT_MAX_MESSAGE_BYTES) + constants.RECORD_HEADROOM_BYTES
        for name in (settings.topic, settings.dead_letter_topic, settings.commands_topic, *extra):
            if name in existing:
                if name == settings.dead_letter_topic:
                    await _warn_if_smaller(client, name, dead_letter_limit)
                continue
            configs = {"max.message.bytes": str(dead_letter_limit)} if name == settings.dead_letter_topic else {}
            try:
                with translate(f"creating topic {name}"):
                    await client.create_topics(
                        [NewTopic(name, num_partitions=partitions, replication_factor=replication, topic_configs=configs)]
                    )
            except BrokerError as exc:
                if not isinstance(exc.__cause__, TopicAlreadyExistsError):
                    raise
            created.append(name)
    if settings.producer_max_request_bytes < dead_letter_limit:
        log.warning(
            "producer_max_request_bytes_too_small",
            producer_max_request_bytes=settings.producer_max_request_bytes,
            dead_letter_max_message_bytes=dead_letter_limit,
            hint="set kafka.producer_max_request_bytes to the dead-letter topic's limit, or near-limit dead letters are truncated",
        )
    return created


async def _warn_if_smaller(client: AIOKafkaAdminClient, topic: str, needed: int) -> None:
    found = await max_message_bytes(client, topic)
    if found is not None and found < needed:
        log.warning(
            "topic_max_message_bytes_too_small",
            topic=topic,
            max_message_bytes=found,
            needed=needed,
            hint=f"kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes={needed}; "
            "until then larger dead letters are truncated",
        )


async def topic_partitions(settings: KafkaSettings, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The partitions of ``topic``; empty if it does not exist."""
    async with admin(settings, timeout_s) as client:
        with translate(f"describing topic {topic}"):
            described = await client.describe_topics([topic])
    return sorted({p["partition"] for found in described if not found["error_code"] for p in found["partitions"]})


class GroupInfo(NamedTuple):
    """A consumer group's state (``Empty``, ``Stable``, ``Dead``...) and its active members."""

    state: str
    members: list[str]  # "client-id@host" of each


async def describe_group(settings: KafkaSettings, group_id: str, timeout_s: float = 10.0) -> GroupInfo:
    """The state and the active members of ``group_id``."""
    state, members = await describe_group_members(settings, group_id, None, timeout_s)
    return GroupInfo(state, [f"{m.client_id}@{m.host}" for m in members])


class GroupMember(NamedTuple):
    """One active member of a consumer group as the coordinator describes it."""

    member_id: str
    client_id: str
    host: str
    partitions: tuple[int, ...]  # of the topic asked about


async def describe_group_members(
    settings: KafkaSettings, group_id: str, topic: str | None, timeout_s: float = 10.0
) -> tuple[str, list[GroupMember]]:
    """The state of ``group_id`` and each active member with the partitions of ``topic`` (if given) assigned to it."""
    async with admin(settings, timeout_s) as client:
        with translate(f"describing consumer group {group_id}"):
            responses = await client.describe_consumer_groups([group_id])
    for response in responses:
        for group in response.to_object()["groups"]:
            if group["group"] == group_id:
                members = [_member(m, topic) for m in group["members"]]
                return group["state"], sorted(members, key=lambda m: (m.partitions[:1], m.member_id))
    return "Dead", []


def _member(described: dict[str, Any], topic: str | None) -> GroupMember:
    partitions: list[int] = []
    if topic is not None and described["member_assignment"]:
        assignment = ConsumerProtocolMemberAssignment.decode(described["member_assignment"])
        partitions = sorted(p for t, ps in assignment.assignment if t == topic for p in ps)
    return GroupMember(described["member_id"], described["client_id"], described["client_host"].lstrip("/"), tuple(partitions))


async def group_offsets(settings: KafkaSettings, group_id: str, topic: str, timeout_s: float = 10.0) -> dict[int, tuple[int, str]]:
    """The committed ``(offset, metadata)`` of ``group_id`` per partition of ``topic`` that has one."""
    async with admin(settings, timeout_s) as client:
        with translate(f"reading the offsets of consumer group {group_id}"):
            found = await client.list_consumer_group_offsets(group_id)
    return {tp.partition: (meta.offset, meta.metadata or "") for tp, meta in found.items() if tp.topic == topic and meta.offset >= 0}


async def commit_group_offsets(
    settings: KafkaSettings, group_id: str, topic: str, offsets: dict[int, int], timeout_s: float = 10.0
) -> None:
    """Set ``group_id``'s committed offsets from outside the group, as Kafka's reset tool does.

    The broker accepts such a commit only while the group has no active member.
    """
    consumer = AIOKafkaConsumer(group_id=group_id, enable_auto_commit=False, **client_options(settings))
    await start_bounded(consumer, settings.bootstrap_servers, timeout_s)
    try:
        tps = {p: TopicPartition(topic, p) for p in offsets}
        consumer.assign(list(tps.values()))
        with translate(f"committing offsets for consumer group {group_id}"):
            await consumer.commit({tps[p]: offset for p, offset in offsets.items()})
    finally:
        await consumer.stop()
