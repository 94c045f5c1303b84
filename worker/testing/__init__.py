"""What handler authors use in their own tests: run an app over events against a throwaway database.

This import path is public; the kit lives in builders, state, http_stub, harness and checks.
"""

from worker.rocketchat.stub import RocketChatStub
from worker.testing.builders import COMMANDS_TOPIC, SOURCE, TEST_PROCESSING, Events, cloud_event, message
from worker.testing.checks import IdempotencyReport, assert_concurrency_safe, assert_idempotent
from worker.testing.harness import Harness, run
from worker.testing.http_stub import HttpStub, StubRequest
from worker.testing.state import Command, DeadLetter, Delivery, State

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
    "IdempotencyReport",
    "RocketChatStub",
    "State",
    "StubRequest",
    "assert_concurrency_safe",
    "assert_idempotent",
    "cloud_event",
    "message",
    "run",
]
