"""The worker's exceptions: one root, one class per thing that can go wrong.

Third-party exceptions are translated at one boundary each (aiokafka in ``worker/kafka/``,
SQLAlchemy in ``persistence/``) and chained with ``from exc``, so callers only ever catch
these. The tree::

    WorkerError
    ├── ConfigError               bad config.yaml or environment; start-up stops
    ├── PluginError               a handler plugin cannot be loaded or set up
    ├── DecodeError               a Kafka record is not a valid contract event
    ├── BrokerError               Kafka cannot be reached or refused a request   (retriable)
    │   └── RecordTooLargeError   a record is larger than the producer or its topic takes
    ├── PersistenceError          the database failed                             (retriable)
    │   ├── SchemaError           the schema is missing or behind; run `rc-worker db upgrade`
    │   ├── DataError             the database refuses a value for good; its event is isolated
    │   └── VersionConflict       something read changed before commit            (retriable)
    ├── FencedError               this worker no longer owns the partition it commits for
    ├── RocketChatError           a Rocket.Chat REST call failed              (retriable: 408, 429, 5xx, no answer)
    └── AppError                  raised inside a handler, or by an accessor because of it
        ├── InvalidDataError      an id or data handed to persistence cannot be stored
        ├── RecordNotFoundError   update without upsert matched no record
        ├── HttpError             an http accessor call failed
        ├── CommandTooLargeError  a command staged through modify is over MAX_COMMAND_BYTES
        ├── UnawaitedCallError    a handler run ended with an accessor call it never awaited
        ├── RocketChatUnavailable a reader needs Rocket.Chat's REST API and no connection is configured
        └── DeadLetterNow         the handler asks to dead-letter this event without retries

``retriable`` says whether doing the same thing again may succeed, so the dispatcher can
classify an exception without a chain of isinstance checks (as aiokafka's ``KafkaError`` does).
"""

from __future__ import annotations


class WorkerError(Exception):
    """Raised for every failure the worker itself reports; the root of this module's tree."""

    retriable: bool = False

    def __init_subclass__(cls, retriable: bool | None = None, **kwargs: object) -> None:
        # Declared in the class line (``class X(WorkerError, retriable=True)``): the tree reads at a glance.
        super().__init_subclass__(**kwargs)
        if retriable is not None:
            cls.retriable = retriable


class ConfigError(WorkerError):
    """Raised when config.yaml or an RC_WORKER_* variable is invalid; names the key and the fix."""


class PluginError(WorkerError):
    """Raised when an enabled handler plugin is missing, duplicated or cannot be set up."""


class DecodeError(WorkerError):
    """Raised when a Kafka record is not a contract event; ``reason`` is what the DLQ records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokerError(WorkerError, retriable=True):
    """Raised when Kafka cannot be reached or refuses a request."""


class RecordTooLargeError(BrokerError, retriable=False):
    """Raised when the producer or the broker refuses a record as too large for the producer or its topic.

    The limits are ``kafka.producer_max_request_bytes`` and the topic's ``max.message.bytes``.
    Sending the same record again fails the same way, so it is not retriable.
    """


class PersistenceError(WorkerError, retriable=True):
    """Raised when the database fails; the unit of work is rolled back and may be retried."""


class SchemaError(PersistenceError, retriable=False):
    """Raised when the database schema is missing or older than this worker needs."""


class DataError(PersistenceError, retriable=False):
    """Raised when the database refuses a value for good (too long, NUL, not UTF-8, a constraint).

    The same data fails the same way every time, so it is never waited out as an outage:
    the dispatcher splits the batch until it finds the event that carries the value and
    dead-letters it with this message (the database's own), and commits the rest.
    """


class VersionConflict(PersistenceError):
    """Raised at commit when a record or association read by the unit of work has changed.

    Not a failure: the unit of work runs again on fresh data. ``keys`` names the version
    keys found changed, when known, so a cache can forget just those.
    """

    def __init__(self, message: str, keys: frozenset[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.keys = keys


class RocketChatError(WorkerError):
    """Raised when a Rocket.Chat REST call fails; ``status`` 0 means no answer (connection refused, timeout).

    ``retry_after`` is the wait in seconds the server asked for (Retry-After or X-RateLimit-Reset), if any.
    """

    def __init__(self, status: int, error: str, retry_after: float | None = None) -> None:
        super().__init__(f"Rocket.Chat answered {status}: {error}" if status else f"Rocket.Chat did not answer: {error}")
        self.status = status
        self.error = error
        self.retry_after = retry_after
        # Throttled, timed out, the server's fault or no answer: the same call may succeed later.
        self.retriable = status in (0, 408, 429) or status >= 500


class FencedError(WorkerError):
    """Raised at commit when another worker has taken over the partition since assignment."""


class AppError(WorkerError, retriable=True):
    """Raised inside a handler run, by the handler itself or by an accessor it called."""


class InvalidDataError(AppError, retriable=False):
    """Raised when an id or data given to persistence cannot be stored: not a JSON object of JSON values, or past a limit."""


class RecordNotFoundError(AppError, retriable=False):
    """Raised when an update without ``upsert=True`` matches no record."""


class HttpError(AppError):
    """Raised when an http accessor request fails (connection, timeout, body too large, or a 4xx/5xx status).

    ``status_code`` is set when the service answered (``HttpResponse.raise_for_status``); a
    4xx other than 408 and 429 is not retriable, as asking again would get the same answer.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retriable = status_code is None or status_code >= 500 or status_code in (408, 429)


class CommandTooLargeError(AppError, retriable=False):
    """Raised at ``finish`` when a command is over ``constants.MAX_COMMAND_BYTES``; that app's event is dead-lettered."""


class UnawaitedCallError(AppError, retriable=False):
    """Raised when a handler run ends with an accessor call it never awaited (so the call did nothing).

    The same code fails the same way on every run, so it is not retriable.
    """


class RocketChatUnavailable(AppError, retriable=False):
    """Raised when a user, room or message reader needs Rocket.Chat's REST API and no ``rocketchat`` connection is configured.

    The message names the reader call and the keys that fix it. ``get_app_user()`` raises it
    only when nothing names the app user either (``rocketchat.app_user_id``, the test kit's
    ``Harness(app_user_id=...)``). Not retriable: the configuration does not change between runs.
    """


class DeadLetterNow(AppError, retriable=False):
    """Raised by a handler that knows it can never process this event; skips the retries."""
