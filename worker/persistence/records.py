"""A record as the database holds it, and a Kafka record waiting in the outbox: the values a unit of work moves."""

from __future__ import annotations

from dataclasses import dataclass

from worker.persistence.keys import Key, association_key, id_key


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as stored: its data as JSON bytes, so no caller can mutate a cached copy."""

    id: str
    data: bytes
    version: int
    associations: tuple[str, ...]

    def keys(self, app_id: str) -> list[Key]:
        """Every version key a write to this record bumps."""
        return [id_key(app_id, self.id), *(association_key(app_id, a) for a in self.associations)]


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A record to publish after commit (a command, or a dead letter).

    ``source_partition``: the partition whose event staged it, where one unit spans several
    (None: the partition of the fence the unit commits with).
    """

    app_id: str | None
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    source_partition: int | None = None
