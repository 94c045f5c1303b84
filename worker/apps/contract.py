"""The handler contract: the App base class, its settings, and the read accessor it is handed.

This is the Apps-Engine's ``IPostMessageSent`` in Python: ``check_post_message_sent(message,
read, http)`` and ``execute_post_message_sent(message, read, http, persistence, modify)``.
The accessors' Protocols are in accessors.py, so a plugin depends on nothing but ``worker``'s public names.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from worker.apps.accessors import (
    IHttp,
    IMessageRead,
    IModify,
    IPersistence,
    IPersistenceRead,
    IRead,
    IRoomRead,
    IUserRead,
)
from worker.apps.getter import Getter
from worker.events import INTERFACES, Message, MessageDeleteContext


class App:
    """Base class of every handler plugin (the Apps-Engine's ``IPostMessageSent``, ``IPostMessageUpdated``, ``IPostMessageDeleted``).

    A plugin subclasses it, defines ``execute_post_message_sent`` (or the ``_updated`` /
    ``_deleted`` one, or several; optionally the ``check_`` pair of each, and a
    ``settings_model``) and registers the class under the
    entry-point group ``rc_worker.handlers``; the entry point's name is the app id. The
    runtime creates it with no arguments, then gives it its id, settings and logger through
    :meth:`bind`. Example::

        class Greeter(App):
            async def execute_post_message_sent(self, message, read, http, persistence, modify):
                self.log.info("message_seen", room=message.room.id)

    Several workers run the same app at once, and a run may be repeated (after a version
    conflict, an error, or a crash): keep state in ``persistence``, never in attributes.

    An app sees the events whose ``execute_`` method it defines, and no other: its
    ``event_types`` are derived from them (set ``event_types`` to narrow them).

    Attributes:
        event_types: the CloudEvents types the app takes; None (the default) means those
            whose ``execute_`` method the class defines.
        handles_own_messages: True to see messages sent by ``rocketchat.app_user_id`` too; by
            default they skip the app, so what the app posts does not trigger it again.
        settings_model: the settings the app accepts, as a pydantic model whose fields give
            types, defaults and which are required; ``handlers.settings.<app id>`` is
            validated against it at start-up. None means the app takes no settings.
        id: the app id (the entry point's name), set by the runtime.
        settings: the validated settings: an instance of ``settings_model``, defaults filled
            in, read-only (``self.settings.limit``; declare ``settings: MySettings`` in the
            class body for typed access). ``self.settings["limit"]`` and
            ``dict(self.settings)`` work too. An app without a model gets an empty one.
        log: a structlog logger bound to ``app=<id>``.

    """

    settings_model: ClassVar[type[BaseModel] | None] = None
    event_types: ClassVar[frozenset[str] | None] = None
    handles_own_messages: ClassVar[bool] = False

    id: str = ""
    settings: Any = None

    @functools.cached_property
    def log(self) -> Any:
        """A structlog logger bound to ``app=<id>``, made on first use.

        Made late so that listing or checking apps (rc-worker handlers, check-config) does not
        import structlog, whose import pulls in rich when that is installed.
        """
        import structlog

        logger = structlog.get_logger("app")
        return logger.bind(app=self.id) if self.id else logger

    def bind(self, app_id: str, settings: BaseModel | Mapping[str, Any]) -> None:
        """Called once by the runtime, before the first event: sets ``id``, ``settings``, ``log``.

        ``settings`` are the values already validated against ``settings_model`` (a model
        instance, or its fields by name); they are kept as a read-only instance of it.
        """
        self.id = app_id
        self.settings = frozen_settings(type(self).settings_model, settings)
        self.__dict__.pop("log", None)  # made again, bound to the id, on first use

    # A repeated shape kept on purpose (issue 13), one kept group with App's check_/execute_ pairs
    # (contract.py), the readers' get_by_* (readers.py) and the persistence accessors (persistence.py):
    # the Apps-Engine's API is one typed method per name over a one-line body; generating them
    # would hide the signatures that handlers are written and type-checked against.
    async def check_post_message_sent(self, message: Message, read: IRead, http: IHttp) -> bool:
        """Return False to skip ``execute_post_message_sent`` for this message (the default runs it)."""
        return True

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        """Handle one sent message.

        Args:
            message: the message that was sent.
            read: reads of this app's records and settings.
            http: outgoing HTTP; may be called again when the run is repeated.
            persistence: writes to this app's records, committed only if nothing read has changed.
            modify: changes to the chat, published once, after commit.

        Raises:
            Exception: any error has the run retried with backoff, then the event dead-lettered
                for this app (``DeadLetterNow`` skips the retries).

        """
        raise NotImplementedError(f"{type(self).__name__} must define execute_post_message_sent")

    async def check_post_message_updated(self, message: Message, read: IRead, http: IHttp) -> bool:
        """Return False to skip ``execute_post_message_updated`` for this message (the default runs it)."""
        return True

    async def execute_post_message_updated(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        """Handle one edited message (CloudEvents type ``chat.rocket.message.updated``).

        Args:
            message: the message as it is after the edit.
            read: as for ``execute_post_message_sent``.
            http: as for ``execute_post_message_sent``.
            persistence: as for ``execute_post_message_sent``.
            modify: as for ``execute_post_message_sent``.

        """
        raise NotImplementedError(f"{type(self).__name__} must define execute_post_message_updated")

    async def check_post_message_deleted(self, message: Message, read: IRead, http: IHttp, context: MessageDeleteContext) -> bool:
        """Return False to skip ``execute_post_message_deleted`` for this message (the default runs it)."""
        return True

    async def execute_post_message_deleted(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify, context: MessageDeleteContext
    ) -> None:
        """Handle one deleted message (CloudEvents type ``chat.rocket.message.deleted``).

        Args:
            message: the message that was deleted.
            read: as for ``execute_post_message_sent``.
            http: as for ``execute_post_message_sent``.
            persistence: as for ``execute_post_message_sent``.
            modify: as for ``execute_post_message_sent``.
            context: the deleted message and who deleted it.

        """
        raise NotImplementedError(f"{type(self).__name__} must define execute_post_message_deleted")

    @classmethod
    def defined_event_types(cls) -> frozenset[str]:
        """The CloudEvents types whose ``execute_`` method this class defines."""
        return frozenset(
            kind for kind, name in INTERFACES.items() if getattr(cls, f"execute_{name}") is not getattr(App, f"execute_{name}")
        )

    @classmethod
    def takes(cls, event_type: str) -> bool:
        """Whether this app sees events of ``event_type``."""
        return event_type in (cls.event_types if cls.event_types is not None else cls.defined_event_types())


@functools.cache
def _field_names(model: type[Any]) -> frozenset[str]:
    return frozenset(model.model_fields)


class _SettingsMapping:
    """Mapping access to a settings model (``settings["limit"]``, ``dict(settings)``), mixed into its frozen copy."""

    model_config = ConfigDict(frozen=True)

    def keys(self) -> list[str]:
        """The setting names (the model's fields, and extra keys where the model allows them)."""
        return [*type(self).model_fields, *(self.model_extra or {})]  # type: ignore[attr-defined]

    def __getitem__(self, name: str) -> Any:
        # Asked by handlers on every event: look the name up, rather than list every key.
        if name not in _field_names(type(self)) and name not in (self.model_extra or {}):  # type: ignore[arg-type,attr-defined]
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()


class _NoSettings(BaseModel):
    """The settings of an app that declares no ``settings_model``: none."""


@functools.cache
def _frozen_model(model: type[BaseModel]) -> type[BaseModel]:
    # A subclass, so isinstance(app.settings, MySettings) holds and the fields validate as
    # declared; frozen, so no run can change what every other run reads.
    return type(model.__name__, (_SettingsMapping, model), {"__module__": model.__module__, "__doc__": model.__doc__})


def frozen_settings(model: type[BaseModel] | None, values: BaseModel | Mapping[str, Any]) -> BaseModel:
    """``values`` (validated against ``model``) as a read-only instance of ``model``."""
    given = values.model_dump() if isinstance(values, BaseModel) else dict(values)
    return _frozen_model(model or _NoSettings).model_validate(given)


class SettingsReader:
    """``read.get_environment_reader().get_settings()``: validated settings of one app."""

    __slots__ = ("_settings",)

    def __init__(self, settings: BaseModel | Mapping[str, Any]) -> None:
        # An app's frozen settings model has mapping access (keys, []); a plain mapping too.
        self._settings: Any = settings

    def get_value_by_id(self, setting_id: str) -> Any:
        """The value of one setting; KeyError names the settings the app has."""
        try:
            return self._settings[setting_id]
        except KeyError:
            known = ", ".join(sorted(self._settings.keys())) or "none"
            raise KeyError(f"no setting {setting_id!r}; this app has: {known}") from None


class EnvironmentReader:
    """``read.get_environment_reader()``."""

    __slots__ = ("_settings",)

    def __init__(self, settings: BaseModel | Mapping[str, Any]) -> None:
        self._settings = SettingsReader(settings)

    get_settings = Getter[SettingsReader]("_settings", "This app's settings.")


class Read:
    """The ``read`` accessor: persistence reads, the environment, and Rocket.Chat's users, rooms and messages."""

    __slots__ = ("_chat", "_environment", "_messages", "_persistence", "_rooms", "_settings", "_users")

    def __init__(self, persistence: IPersistenceRead, settings: BaseModel | Mapping[str, Any], chat: ChatReaders | None = None) -> None:
        self._persistence = persistence
        self._settings = settings
        self._chat = chat
        # Made on first use (see Getter): a handler run reads one or two of them, if any.
        self._environment: EnvironmentReader | None = None
        self._users: IUserRead | None = None
        self._rooms: IRoomRead | None = None
        self._messages: IMessageRead | None = None

    def _build(self, attribute: str) -> Any:
        if attribute == "_environment":
            made: Any = EnvironmentReader(self._settings)
        else:
            if self._chat is None:
                # Imported here: the readers bring httpx, which the commands that only list or
                # check apps (rc-worker handlers, check-config) should not pay for at start-up.
                from worker.apps.readers import Directory

                self._chat = Directory().for_message(None)
            made = getattr(self._chat, attribute.removeprefix("_"))
        setattr(self, attribute, made)
        return made

    get_persistence_reader = Getter[IPersistenceRead]("_persistence", "Reads of this app's records.")
    get_environment_reader = Getter["EnvironmentReader"]("_environment", "This app's settings.")
    get_user_reader = Getter[IUserRead]("_users", "Rocket.Chat users, the app's own user included.")
    get_room_reader = Getter[IRoomRead]("_rooms", "Rocket.Chat rooms and their members.")
    get_message_reader = Getter[IMessageRead]("_messages", "Rocket.Chat messages.")


class ChatReaders(Protocol):
    """The user, room and message readers of one handler run (``worker.apps.readers.Readers``)."""

    @property
    def users(self) -> IUserRead:
        """``read.get_user_reader()``."""
        ...

    @property
    def rooms(self) -> IRoomRead:
        """``read.get_room_reader()``."""
        ...

    @property
    def messages(self) -> IMessageRead:
        """``read.get_message_reader()``."""
        ...
