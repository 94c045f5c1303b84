"""The user, room and message readers: what a handler may read of Rocket.Chat itself.

An event carries its message, the sender and the room; a reader answers from those first.
Anything else is asked of Rocket.Chat's REST API through the ``rocketchat`` section's client
and kept in one bounded cache per worker (``constants.DIRECTORY_CACHE_*``), shared by every
app and event, so that a busy room does not cost a REST call per event. Without that
section, such reads raise :class:`~worker.errors.RocketChatUnavailable`; so does
``get_app_user()``, unless ``rocketchat.app_user_id`` (or the test kit) names the app user.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cachetools import TTLCache
from pydantic import ValidationError

from worker import constants
from worker.config import RocketChatSettings
from worker.errors import RocketChatError, RocketChatUnavailable
from worker.events import Message, Room, User
from worker.rocketchat.client import RocketChatClient
from worker.rocketchat.stub import RocketChatStub

_T = TypeVar("_T")
_K = TypeVar("_K", User, Room)
# A Directory lookup: (REST key, value, what is being read) -> the user or room, or None.
_Ask = Callable[[str, str, str], Awaitable[_K | None]]
_CONNECT = (
    "set rocketchat.url, rocketchat.user_id and rocketchat.auth_token in config.yaml (or RC_WORKER_ROCKETCHAT__URL, "
    "RC_WORKER_ROCKETCHAT__USER_ID, RC_WORKER_ROCKETCHAT__AUTH_TOKEN)"
)
_FIX = f"{_CONNECT}; in tests, give the harness a RocketChatStub (Harness(app, rocketchat=RocketChatStub(...)))"
_FIX_APP_USER = (
    f"{_CONNECT}, or for the app user alone rocketchat.app_user_id (RC_WORKER_ROCKETCHAT__APP_USER_ID); "
    "in tests, Harness(app_user_id=...) or a RocketChatStub (Harness(app, rocketchat=RocketChatStub(...)))"
)
# Rocket.Chat answers an unknown id or name with 400 (users.info, rooms.info, chat.getMessage) or 404.
_NOT_FOUND = {400, 404}
# The event's own user or room field that a REST lookup key matches (users.info, rooms.info).
_EVENT_FIELD = {"userId": "id", "username": "username", "roomId": "id", "roomName": "slugified_name"}
# The members endpoint of each room type; others (livechat) through the generic one.
_MEMBERS = {"c": "channels.members", "p": "groups.members", "d": "im.members"}


class Directory:
    """Rocket.Chat's users, rooms and messages for one worker: REST answers, cached.

    Args:
        client: the REST client, or None when no ``rocketchat`` section is configured.
        app_user_id: the app user's id, looked up over REST (needs a client).
        app_user: the app user itself, known without asking Rocket.Chat (the test kit's
            ``Harness(app_user_id=...)``, or ``rocketchat.app_user_id`` with no connection);
            it sets ``app_user_id``, with or without a client.

    """

    def __init__(self, client: RocketChatClient | None = None, *, app_user_id: str | None = None, app_user: User | None = None) -> None:
        self.client = client
        self.app_user = app_user
        self.app_user_id = app_user.id if app_user is not None else (app_user_id if client is not None else None)
        self._cache: TTLCache[tuple[str, str], Any] = TTLCache(constants.DIRECTORY_CACHE_ENTRIES, constants.DIRECTORY_CACHE_TTL_S)

    @classmethod
    def from_settings(cls, settings: RocketChatSettings) -> Directory:
        """A directory over the configured Rocket.Chat, or answering from events (and the app user's id, if set) when it is not."""
        if not settings.configured:
            # rocketchat.app_user_id alone (the loop guard's) still names the app user: only its id is known.
            return cls(app_user=User(id=settings.app_user_id, type="app") if settings.app_user_id else None)
        # The app user is the account the worker is known by: rocketchat.app_user_id (the loop
        # guard's), else the one it calls the REST API as.
        return cls(RocketChatClient(settings), app_user_id=settings.app_user_id or settings.user_id)

    @classmethod
    def over(cls, stub: RocketChatStub, app_user: User | None = None) -> Directory:
        """A directory whose REST calls the stub answers (tests); ``app_user`` is known without a call."""
        return cls(RocketChatClient(stub.settings, transport=stub.transport), app_user_id=stub.settings.user_id, app_user=app_user)

    async def aclose(self) -> None:
        """Close the REST client's connections."""
        if self.client is not None:
            await self.client.aclose()

    def for_message(self, message: Message | None) -> Readers:
        """The readers of one handler run, answering from ``message`` (the event's) where they can."""
        return Readers(self, message)

    async def user(self, by: str, value: str, what: str) -> User | None:
        """A user by ``userId`` or ``username``, cached under both."""
        known = self.app_user
        if known is not None and value == (known.id if by == "userId" else known.username):
            return known
        user = await self._cached(("user", f"{by}:{value}"), what, lambda client: client.call("GET", "users.info", params={by: value}))
        if user is not None:
            self._cache[("user", f"userId:{user.get('_id')}")] = user
        return _user(user) if user is not None else None

    async def room(self, by: str, value: str, what: str) -> Room | None:
        """A room by ``roomId`` or ``roomName``."""
        room = await self._cached(("room", f"{by}:{value}"), what, lambda client: client.call("GET", "rooms.info", params={by: value}))
        return _room(room) if room is not None else None

    async def message(self, message_id: str, what: str) -> Message | None:
        """A message by id."""
        found = await self._cached(
            ("message", message_id), what, lambda client: client.call("GET", "chat.getMessage", params={"msgId": message_id})
        )
        return _message(found) if found is not None else None

    async def members(self, room: Room, what: str) -> list[User]:
        """Every member of ``room``, page by page, up to ``constants.MEMBERS_LIMIT``."""
        endpoint = _MEMBERS.get(room.type or "", "rooms.membersOrderedByRole")
        found: list[dict[str, Any]] = []
        while len(found) < constants.MEMBERS_LIMIT:
            offset = len(found)
            page = await self._call(
                what,
                lambda client, offset=offset: client.call(  # type: ignore[misc]
                    "GET", endpoint, params={"roomId": room.id, "offset": offset, "count": constants.MEMBERS_PAGE_SIZE}
                ),
            )
            members = page.get("members") or []
            found += members
            if not members or len(found) >= int(page.get("total", len(found))):
                break
        return [_user(member) for member in found[: constants.MEMBERS_LIMIT]]

    async def _cached(self, key: tuple[str, str], what: str, call: Callable[[RocketChatClient], Awaitable[dict[str, Any]]]) -> Any:
        if key in self._cache:
            return self._cache[key]
        try:
            answer = await self._call(what, call)
        except RocketChatError as exc:
            if exc.status in _NOT_FOUND:
                return None  # not cached: it may exist soon
            raise
        # users.info answers {"user": ...}, rooms.info {"room": ...}, chat.getMessage {"message": ...}.
        found = answer.get(key[0])
        if isinstance(found, dict):
            self._cache[key] = found
            return found
        return None

    async def _call(self, what: str, call: Callable[[RocketChatClient], Awaitable[_T]]) -> _T:
        if self.client is None:
            raise unavailable(what, _FIX)
        return await call(self.client)


def unavailable(what: str, fix: str) -> RocketChatUnavailable:
    """The error of a reader call ``what`` that needs Rocket.Chat with no connection configured, and how to fix that."""
    return RocketChatUnavailable(f"{what} needs Rocket.Chat's REST API, and no Rocket.Chat connection is configured: {fix}")


class Readers:
    """The user, room and message readers of one handler run, each made when first asked for."""

    __slots__ = ("_directory", "_message", "_messages", "_rooms", "_users")

    def __init__(self, directory: Directory, message: Message | None) -> None:
        self._directory, self._message = directory, message
        self._users: UserReader | None = None
        self._rooms: RoomReader | None = None
        self._messages: MessageReader | None = None

    @property
    def users(self) -> UserReader:
        """``read.get_user_reader()``."""
        if self._users is None:
            self._users = UserReader(self._directory, self._message)
        return self._users

    @property
    def rooms(self) -> RoomReader:
        """``read.get_room_reader()``."""
        if self._rooms is None:
            self._rooms = RoomReader(self._directory, self._message)
        return self._rooms

    @property
    def messages(self) -> MessageReader:
        """``read.get_message_reader()``."""
        if self._messages is None:
            self._messages = MessageReader(self._directory, self._message)
        return self._messages


class _EventFirst:
    """A reader of one handler run: what the event carries (its message, sender, room) it answers itself."""

    __slots__ = ("_directory", "_message")
    _name = ""  # the reader's getter on ``read``, for error messages

    def __init__(self, directory: Directory, message: Message | None) -> None:
        self._directory, self._message = directory, message

    async def _lookup(self, own: _K | None, by: str, value: str, call: str, ask: _Ask[_K]) -> _K | None:
        """``own`` (the event's) when it is the one looked up ``by`` (a REST key) ``value``, else Rocket.Chat's answer."""
        if own is not None and getattr(own, _EVENT_FIELD[by]) == value:
            return own
        return await ask(by, value, f"read.{self._name}().{call}")


class UserReader(_EventFirst):
    """``read.get_user_reader()``: the event's sender from the event, other users over REST (``users.info``)."""

    __slots__ = ()
    _name = "get_user_reader"

    async def get_app_user(self) -> User | None:
        """The worker's own Rocket.Chat user (``rocketchat.app_user_id``, else ``rocketchat.user_id``), or None if Rocket.Chat has none.

        Raises:
            RocketChatUnavailable: no Rocket.Chat connection is configured and nothing names the app user.

        """
        if self._directory.app_user_id is None:
            raise unavailable(f"read.{self._name}().get_app_user()", _FIX_APP_USER)
        return await self.get_by_id(self._directory.app_user_id)

    # A repeated shape kept on purpose (issue 13), one kept group with App's check_/execute_ pairs
    # (contract.py), the readers' get_by_* (readers.py) and the persistence accessors (persistence.py):
    # the Apps-Engine's API is one typed method per name over a one-line body; generating them
    # would hide the signatures that handlers are written and type-checked against.
    async def get_by_id(self, user_id: str) -> User | None:
        """The user with this id, or None."""
        return await self._lookup(self._sender(), "userId", user_id, f"get_by_id({user_id!r})", self._directory.user)

    async def get_by_username(self, username: str) -> User | None:
        """The user with this username, or None."""
        return await self._lookup(self._sender(), "username", username, f"get_by_username({username!r})", self._directory.user)

    def _sender(self) -> User | None:
        return self._message.sender if self._message else None


class RoomReader(_EventFirst):
    """``read.get_room_reader()``: the event's room from the event, other rooms and members over REST."""

    __slots__ = ()
    _name = "get_room_reader"

    async def get_by_id(self, room_id: str) -> Room | None:
        """The room with this id, or None."""
        return await self._lookup(self._room(), "roomId", room_id, f"get_by_id({room_id!r})", self._directory.room)

    async def get_by_name(self, name: str) -> Room | None:
        """The room with this name (slugified), or None."""
        return await self._lookup(self._room(), "roomName", name, f"get_by_name({name!r})", self._directory.room)

    def _room(self) -> Room | None:
        return self._message.room if self._message else None

    async def get_members(self, room_id: str) -> list[User]:
        """The room's members; an unknown room has none."""
        call = f"get_members({room_id!r})"
        room = await self._lookup(self._room(), "roomId", room_id, call, self._directory.room)
        if room is None:
            return []
        return await self._directory.members(room, f"read.{self._name}().{call}")


class MessageReader(_EventFirst):
    """``read.get_message_reader()``: the event's message from the event, others over REST (``chat.getMessage``)."""

    __slots__ = ()
    _name = "get_message_reader"

    async def get_by_id(self, message_id: str) -> Message | None:
        """The message with this id, or None."""
        if self._message is not None and self._message.id == message_id:
            return self._message
        return await self._directory.message(message_id, f"read.{self._name}().get_by_id({message_id!r})")


# -- Rocket.Chat's REST documents to the contract's models ------------------------------------


def _user(doc: dict[str, Any]) -> User:
    fields = {k: v for k, v in doc.items() if k != "_id"}
    return User.model_validate({**fields, "id": doc.get("_id")})


def _room(doc: dict[str, Any]) -> Room:
    fields = {k: v for k, v in doc.items() if k not in ("_id", "t", "name")}
    kind = doc.get("t") if doc.get("t") in ("c", "p", "d", "l") else None
    return Room.model_validate({**fields, "id": doc.get("_id"), "slugifiedName": doc.get("name"), "type": kind})


def _message(doc: dict[str, Any]) -> Message | None:
    sender = doc.get("u") or {}
    fields = {k: v for k, v in doc.items() if k not in ("_id", "rid", "u", "msg", "ts", "_updatedAt", "tmid", "t")}
    data = {
        **fields,
        "id": doc.get("_id"),
        "room": {"id": doc.get("rid")},
        "sender": {"id": sender.get("_id"), "username": sender.get("username"), "name": sender.get("name")},
        "text": doc.get("msg"),
        "createdAt": doc.get("ts"),
        "updatedAt": doc.get("_updatedAt"),
        "threadId": doc.get("tmid"),
        "type": doc.get("t"),
    }
    try:
        return Message.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        raise RocketChatError(200, f"chat.getMessage answered a message this worker cannot read: {exc.errors()[0]['msg']}") from exc
