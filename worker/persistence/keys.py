"""Version keys: what a unit of work reads and writes is versioned per record id and per association."""

from __future__ import annotations

import functools
from collections.abc import Sequence

# (app id, key); key is "id:<record id>" or "as:<association>", one version each.
Key = tuple[str, str]
RecordRef = tuple[str, str]  # (app id, record id)
Marker = tuple[str, str, str]  # (app id, CloudEvents source, CloudEvents id)


def id_key(app_id: str, record_id: str) -> Key:
    """The version key of one record."""
    return (app_id, f"id:{record_id}")


def association_key(app_id: str, association: str) -> Key:
    """The version key of one association, "nothing has it yet" included."""
    return (app_id, f"as:{association}")


# Events are keyed by room: the association of the records a room owns starts so.
ROOM_PREFIX = "room:"
# Models by how few writers their records have: events are keyed by room, so what a room
# (or a message in it) owns is written by one partition's lane; misc is often app-global.
_GUARD_RANK = {"room": 0, "discussion": 1, "message": 2, "livechat-message": 3, "file": 4, "video-conference": 5, "user": 6}


@functools.lru_cache(maxsize=65_536)
def _guard_of(associations: tuple[str, ...]) -> str:
    return min(associations, key=lambda a: (_GUARD_RANK.get(a.partition(":")[0], len(_GUARD_RANK)), a))


def guard_association(associations: Sequence[str]) -> str:
    """The association whose version guards a query for records having all ``associations`` (see guard_key)."""
    if len(associations) == 1:
        return associations[0]
    return _guard_of(tuple(associations))  # cached: a handler asks the same few queries every event


def scoped(association: str) -> bool:
    """Whether ``association`` names something small (a room, a user...), not an app-global misc one.

    Its records are few, so one read of all of them can answer every query it guards.
    """
    return association.partition(":")[0] in _GUARD_RANK


def guard_key(app_id: str, associations: Sequence[str]) -> Key:
    """The one version key that guards a query for records having all ``associations``.

    Every record in the result carries each of the associations, and any write to a record
    bumps the keys of all its associations, so a change to the result bumps every one of
    them: checking one is enough. Checking the one with the fewest writers (a room's rather
    than a global misc one) spares the query conflicts with unrelated writes elsewhere.
    """
    return association_key(app_id, guard_association(associations))
