"""Names and defaults shared by the worker, in one place, each with the reason for its value."""

from __future__ import annotations

# The contract's defaults (see docs/contract.md).
DEFAULT_TOPIC = "rocketchat.message.sent"
DEFAULT_DEAD_LETTER_TOPIC = "rocketchat.message.sent.dlq"
DEFAULT_COMMANDS_TOPIC = "rocketchat.message.command"
DEFAULT_GROUP_ID = "rc-apps-worker"
DEFAULT_BOOTSTRAP_SERVERS = "127.0.0.1:9092"
# A file beside the working directory: the embedded default needs no server at all.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///rc-worker.db"

# CloudEvents type of the only event this worker handles today.
POST_MESSAGE_SENT = "chat.rocket.message.sent"
CLOUDEVENTS_SPECVERSION = "1.0"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
# Any structured format (+json, +avro...) is announced this way; only JSON is decoded.
STRUCTURED_CONTENT_TYPE_PREFIX = "application/cloudevents"
# The other message events an app (or an outgoing webhook) reports; ingest takes all three.
POST_MESSAGE_UPDATED = "chat.rocket.message.updated"
POST_MESSAGE_DELETED = "chat.rocket.message.deleted"

# Entry-point group through which handler plugins are found, built-in ones included.
HANDLER_ENTRY_POINT_GROUP = "rc_worker.handlers"

# Dead-letter headers: the reason and where the record came from (Kafka Connect uses the
# same idea with __connect.errors.*; ours are short and documented in the README).
DLQ_REASON = "rc-dlq-reason"
DLQ_STAGE = "rc-dlq-stage"
DLQ_APP = "rc-dlq-app"
DLQ_ERROR_TYPE = "rc-dlq-error-type"
DLQ_TOPIC = "rc-dlq-topic"
DLQ_PARTITION = "rc-dlq-partition"
DLQ_OFFSET = "rc-dlq-offset"
DLQ_TIMESTAMP = "rc-dlq-timestamp"
# A dead letter cut to fit its topic: the value's original size in bytes (the value is its
# first bytes), and how many of the record's own headers had to be left out as well.
DLQ_TRUNCATED = "rc-dlq-truncated"
DLQ_HEADERS_DROPPED = "rc-dlq-headers-dropped"
# Every record published from the outbox carries its row id, so a reader can drop repeats.
OUTBOX_ID_HEADER = "rc-outbox-id"

# Record sizes on the way out. Kafka's max.message.bytes bounds a whole record batch, so any
# record an event topic holds can be about that large. A dead letter adds rc-dlq-* headers
# (the reason alone up to 2,000 bytes) and the outbox id: `rc-worker topics create` gives the
# dead-letter topic this much more than the event topic, so it takes any dead letter whole.
RECORD_HEADROOM_BYTES = 65_536
# Kafka's default message.max.bytes (1 MiB + 12), when the cluster does not say its own.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# The largest command (value and key) a handler may stage: a larger one is refused at
# staging, as a handler error, so it never blocks the outbox behind it. Well within Kafka's
# default limit, headers and batch framing included, so the commands topic needs no setting.
MAX_COMMAND_BYTES = 1_000_000

# Bounds on untrusted input: larger values go to the dead-letter topic, not into memory twice.
MAX_VALUE_BYTES = 1_000_000
MAX_JSON_DEPTH = 64
# A record carries a handful of headers (ce_*, content-type, tracing); hundreds of them, or
# more than 64 KiB, are a bug or an attack, refused before anything else is read.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 65_536

# What the user, room and message readers keep of Rocket.Chat's REST answers: a bounded
# cache, so a busy room does not cost one REST call per event, and an answer a few minutes
# old at most (a renamed user or a new member shows within that time).
DIRECTORY_CACHE_ENTRIES = 10_000
DIRECTORY_CACHE_TTL_S = 300.0
# get_members pages through a room's members this many at a time, and stops at the limit.
MEMBERS_PAGE_SIZE = 100
MEMBERS_LIMIT = 10_000
# rc-worker apply: tries of one offset commit (with backoff) before the run ends; a restart
# resumes from the last commit, and the commands after it are applied again, harmlessly.
APPLY_COMMIT_ATTEMPTS = 10
