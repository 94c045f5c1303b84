"""The tables behind the Apps-Engine persistence API, and the bookkeeping that makes it safe.

``records`` and ``record_associations`` are what the Apps-Engine stores. ``key_versions`` is
what it lacks: one version per record id and per association, bumped by every commit that
writes it, so a unit of work can check at commit that nothing it read has changed, including
"no record had this association yet". The migrations in ``migrations/versions`` create
exactly these tables; a test compares the two. Column lengths come from ``worker/limits.py``, which
the checks of incoming values use as well.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)

from worker.limits import (
    APP_ID_MAX,
    ASSOCIATION_MAX,
    EVENT_ID_MAX,
    EVENT_SOURCE_MAX,
    NAME_MAX,
    RECORD_ID_MAX,
    VERSION_KEY_MAX,
)

metadata = MetaData()

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid); PostgreSQL wants BIGINT.
_AutoId = BigInteger().with_variant(Integer(), "sqlite")

records = Table(
    "records",
    metadata,
    Column("app_id", String(APP_ID_MAX), primary_key=True),
    Column("id", String(RECORD_ID_MAX), primary_key=True),
    Column("data", Text, nullable=False),  # a JSON object, serialised by the worker
    Column("version", BigInteger, nullable=False),
    # The association list again, as JSON, so one query returns whole records; the table
    # below is the index that association reads use.
    Column("associations", Text, nullable=False),
)

record_associations = Table(
    "record_associations",
    metadata,
    Column("app_id", String(APP_ID_MAX), primary_key=True),
    Column("association", String(ASSOCIATION_MAX), primary_key=True),  # "model:id"
    Column("record_id", String(RECORD_ID_MAX), primary_key=True),
    Index("ix_record_associations_record", "app_id", "record_id"),
)

key_versions = Table(
    "key_versions",
    metadata,
    Column("app_id", String(APP_ID_MAX), nullable=False),
    Column("key", String(VERSION_KEY_MAX), nullable=False),  # "id:<record id>" or "as:<model>:<id>"
    Column("version", BigInteger, nullable=False),
    # The key leads, the selective column: see processed_events below.
    PrimaryKeyConstraint("key", "app_id", name="key_versions_pkey"),
)

processed_events = Table(
    "processed_events",
    metadata,
    Column("app_id", String(APP_ID_MAX), nullable=False),
    Column("source", String(EVENT_SOURCE_MAX), nullable=False),
    Column("event_id", String(EVENT_ID_MAX), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    # The event id leads: app and source are the same on nearly every row, so a key that
    # started with them left the planner scanning the whole app's markers on a fresh table.
    PrimaryKeyConstraint("event_id", "source", "app_id", name="processed_events_pkey"),
    # Retention (persistence/retention.py) deletes the oldest markers a batch at a time.
    Index("ix_processed_events_processed_at", "processed_at"),
)

partition_offsets = Table(
    "partition_offsets",
    metadata,
    Column("group_id", String(NAME_MAX), primary_key=True),
    Column("topic", String(NAME_MAX), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("generation", BigInteger, nullable=False),  # bumped by every new owner: the fence
    Column("owner", String(NAME_MAX), nullable=False),
    Column("next_offset", BigInteger, nullable=True),  # committed with the state it produced
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", _AutoId, primary_key=True, autoincrement=True),
    Column("app_id", String(APP_ID_MAX), nullable=True),  # None for the worker's own dead letters
    # The partition whose batch staged the row: only that partition's owner publishes it.
    Column("source_topic", String(NAME_MAX), nullable=True),
    Column("source_partition", Integer, nullable=True),
    Column("topic", String(NAME_MAX), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    Column("headers", Text, nullable=False),  # JSON list of [name, base64 value]
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Written before the first send: where the row goes and where that partition ended then,
    # so a new owner can read back what a crashed one already published and send the rest.
    Column("target_partition", Integer, nullable=True),
    Column("attempt_offset", BigInteger, nullable=True),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Index("ix_outbox_unpublished", "source_topic", "source_partition", "published_at", "id"),
    # Published rows stay: the backlog per topic (the status pages) is counted over this partial index alone.
    Index("ix_outbox_backlog", "topic", postgresql_where=text("published_at IS NULL"), sqlite_where=text("published_at IS NULL")),
)

# Dead letters sent back by `rc-worker dlq redrive`: claimed before sending, so none is
# re-driven twice; sent_at stays empty if the send failed, and the next redrive resends it.
dlq_redrives = Table(
    "dlq_redrives",
    metadata,
    Column("dlq_topic", String(NAME_MAX), primary_key=True),
    Column("dlq_partition", Integer, primary_key=True),
    Column("dlq_offset", BigInteger, primary_key=True),
    Column("target", String(NAME_MAX), nullable=False),  # "topic:<name>" or "app:<app id>"
    Column("redriven_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=True),
)

# Each running worker's row, renewed every few seconds by its monitor: where its status
# endpoint answers and which Kafka member it is, so the status pages (worker.web) can ask
# every member of the group. Rows not renewed for a while belong to workers that are gone.
worker_members = Table(
    "worker_members",
    metadata,
    Column("member", String(250), primary_key=True),  # the worker's owner name, as in partition_offsets.owner
    Column("group_id", String(250), nullable=False),
    Column("topic", String(250), nullable=False),
    Column("host", String(250), nullable=False),
    Column("kafka_member_id", String(250), nullable=True),
    Column("url", String(500), nullable=True),  # the observability endpoint, None when disabled
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
    Index("ix_worker_members_group", "group_id", "topic", "seen_at"),
)
