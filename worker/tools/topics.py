"""``rc-worker topics create``: the event, dead-letter and commands topics, and apply's dead-letter topic, if missing."""

from __future__ import annotations

import argparse

from worker.config import Settings
from worker.errors import ConfigError


async def create_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker topics create [--partitions N]``: create what is missing, print what was created."""
    from worker.bridge.apply import dead_letter_topic_of
    from worker.kafka import create_topics

    if args.partitions < 1:
        raise ConfigError("--partitions must be at least 1")
    created = await create_topics(settings.kafka, args.partitions, extra=[dead_letter_topic_of(settings)])
    for name in created:
        print(f"created {name}")
    if not created:
        print("all topics exist")
    return 0
