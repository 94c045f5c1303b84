"""What one replay process did, summed over its batches: the figures ``rc-worker replay`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.pipeline.tally import BatchResult, TotalOf


@dataclass
class ReplaySummary:
    """What one replay process did; ``render`` is what the command prints."""

    topic: str
    partitions: int = 0
    records: int = 0
    duration_s: float = 0.0
    total: BatchResult = field(default_factory=lambda: BatchResult(next_offset=0))

    def add(self, result: BatchResult, records: int) -> None:
        """Count one committed batch of ``records`` records."""
        self.records += records
        self.total.add(result)

    events = TotalOf[int]("processed", "Events an app ran on, committed.")
    duplicates = TotalOf[int]("duplicates", "Events an app had already processed.")
    skipped = TotalOf[int]("skipped", "Events of a type the apps do not handle.")
    dead_letters = TotalOf[int]("dead_letters", "Undecodable records, and events an app failed for good (counted per app).")
    conflicts = TotalOf[int]("conflicts", "Version conflicts retried.")
    per_app = TotalOf[dict[str, int]]("per_app", "Events processed, by app.")

    @property
    def rate(self) -> float:
        """Records per second."""
        return self.records / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values."""
        counts = {name: getattr(self, name) for name in ("events", "duplicates", "skipped", "dead_letters", "conflicts")}
        return {
            "topic": self.topic,
            "partitions": self.partitions,
            "records": self.records,
            **counts,
            "per_app": dict(self.per_app),
            "duration_s": round(self.duration_s, 3),
            "records_per_s": round(self.rate, 1),
        }

    def render(self) -> str:
        """A few lines for a terminal."""
        head = f"replayed {self.records} records of {self.topic} ({self.partitions} partitions) in {self.duration_s:.1f}s"
        tail = f"duplicates: {self.duplicates}  skipped: {self.skipped}  dead letters: {self.dead_letters}  conflicts retried: {self.conflicts}"
        lines = [
            f"{head}: {self.rate:.0f} events/s",
            *(f"  {app_id}: {count} events" for app_id, count in sorted(self.per_app.items())),
            f"  {tail}",
        ]
        return "\n".join(lines)
