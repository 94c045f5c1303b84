"""``rc-worker db`` and ``rc-worker state``: migrate, prune processed-event markers, and read an app's records."""

from __future__ import annotations

import argparse
import sys

import orjson

from worker.config import Settings
from worker.errors import ConfigError, InvalidDataError
from worker.persistence.associations import Association
from worker.persistence.retention import cutoff_for, prune_processed
from worker.persistence.store import Store


async def upgrade_command(settings: Settings, _args: argparse.Namespace) -> int:
    """``rc-worker db upgrade``: create or migrate the schema."""
    store = Store.from_settings(settings.persistence)
    try:
        before, after = await store.upgrade()
    finally:
        await store.close()
    print(f"schema at revision {after}" + (f" (was {before})" if before != after else " (already current)"))
    return 0


async def get_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker state get``: the data of an app's records with an association, as a JSON list."""
    try:
        association = str(Association.parse(args.association))
    except InvalidDataError as exc:
        raise ConfigError(f"--association: {exc}") from None
    store = Store.from_settings(settings.persistence)
    try:
        await store.check_schema()
        found = await store.app_records(args.app, association)
    finally:
        await store.close()
    sys.stdout.write(orjson.dumps([orjson.loads(r.data) for r in found]).decode() + "\n")
    return 0


async def dump_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker state dump``: every record of an app, one JSON object a line."""
    store = Store.from_settings(settings.persistence)
    try:
        await store.check_schema()
        found = await store.app_records(args.app)
    finally:
        await store.close()
    for record in found:
        line = {"id": record.id, "version": record.version, "associations": list(record.associations), "data": orjson.loads(record.data)}
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
    return 0


# -- rc-worker db prune -------------------------------------------------------------------


async def prune_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker db prune [--older-than-hours N]``: delete expired markers once, print how many."""
    hours: int = settings.persistence.processed_retention_hours if args.older_than_hours is None else args.older_than_hours
    if hours < 0:
        raise ConfigError(f"--older-than-hours must be 0 (keep forever) or more, not {hours}")
    if hours == 0:
        print("retention is 0 hours (keep forever): no processed-event markers removed")
        return 0
    cutoff = cutoff_for(hours)
    store = Store.from_settings(settings.persistence)
    try:
        await store.check_schema()
        removed = await prune_processed(store, cutoff)
    finally:
        await store.close()
    print(f"removed {removed} processed-event markers older than {hours} hours (processed before {cutoff.isoformat()})")
    return 0
