"""The only door to aiokafka, split by role: client options and errors, the group member, the producer, readers, admin."""

from worker.kafka.admin import (
    GroupInfo,
    GroupMember,
    admin,
    commit_group_offsets,
    create_topics,
    describe_group,
    describe_group_members,
    group_offsets,
    max_message_bytes,
    topic_partitions,
)
from worker.kafka.client import client_options, record_bytes, translate
from worker.kafka.member import Consumer, PartitionsCallback
from worker.kafka.producer import Outgoing, Producer
from worker.kafka.readers import PartitionReader, Reader, read_topic

__all__ = [
    "Consumer",
    "GroupInfo",
    "GroupMember",
    "Outgoing",
    "PartitionReader",
    "PartitionsCallback",
    "Producer",
    "Reader",
    "admin",
    "client_options",
    "commit_group_offsets",
    "create_topics",
    "describe_group",
    "describe_group_members",
    "group_offsets",
    "max_message_bytes",
    "read_topic",
    "record_bytes",
    "topic_partitions",
    "translate",
]
