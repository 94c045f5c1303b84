"""Association records: the Apps-Engine's way of tagging persisted data with what it is about."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from worker.errors import InvalidDataError


class AssociationModel(enum.StrEnum):
    """The Apps-Engine's RocketChatAssociationModel, with its wire names as values."""

    ROOM = "room"
    DISCUSSION = "discussion"
    MESSAGE = "message"
    LIVECHAT_MESSAGE = "livechat-message"
    USER = "user"
    FILE = "file"
    MISC = "misc"
    VIDEO_CONFERENCE = "video-conference"


@dataclass(frozen=True, slots=True, order=True)
class Association:
    """RocketChatAssociationRecord: a model and an id, e.g. ``Association(AssociationModel.MISC, "count")``."""

    model: AssociationModel
    id: str
    # "model:id", made once: handlers build and read associations on every event.
    _text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InvalidDataError(f"association id must be a non-empty string, not {self.id!r}")
        # Accept the wire name ("room") as well as the member, and fail at the call if unknown.
        if not isinstance(self.model, AssociationModel):
            try:
                object.__setattr__(self, "model", AssociationModel(self.model))
            except ValueError:
                allowed = ", ".join(m.value for m in AssociationModel)
                raise InvalidDataError(f"unknown association model {self.model!r}; use one of: {allowed}") from None
        object.__setattr__(self, "_text", f"{self.model.value}:{self.id}")

    def __str__(self) -> str:
        return self._text

    @classmethod
    def parse(cls, text: str) -> Association:
        """Parse ``"model:id"`` (as the CLI and dumps write it)."""
        model, sep, ident = text.partition(":")
        if not sep:
            raise InvalidDataError(f"association {text!r} must be MODEL:ID, e.g. misc:message-count")
        # __post_init__ turns the wire name into the member, or names the allowed models.
        return cls(model, ident)  # type: ignore[arg-type]
