"""What handler authors use in their own tests (see :mod:`worker.testing.harness`); this import path is public."""

from worker.testing.harness import (
    COMMANDS_TOPIC,
    SOURCE,
    TEST_PROCESSING,
    Command,
    DeadLetter,
    Delivery,
    Events,
    Harness,
    HttpStub,
    State,
    StubRequest,
    assert_concurrency_safe,
    assert_idempotent,
    cloud_event,
    message,
    run,
)

__all__ = [
    "COMMANDS_TOPIC",
    "SOURCE",
    "TEST_PROCESSING",
    "Command",
    "DeadLetter",
    "Delivery",
    "Events",
    "Harness",
    "HttpStub",
    "State",
    "StubRequest",
    "assert_concurrency_safe",
    "assert_idempotent",
    "cloud_event",
    "message",
    "run",
]
