"""message-count: the Apps-Engine persistence guide's example, made right.

The guide's handler reads the count, adds one and *creates* a new record every time, with
no concurrency control. This one is written just as naively (read, add one, write back) but
writes with ``update_by_association(..., upsert=True)``, so there is one record per counter;
the worker's version checks make it exact under any number of workers, and its processed
markers make a redelivered event count once.
"""

from __future__ import annotations

from worker import App, Association, AssociationModel, IHttp, IModify, IPersistence, IRead, Message

TOTAL = Association(AssociationModel.MISC, "message-count")


class MessageCount(App):
    """Counts sent messages: in total (misc:message-count) and per room (room:<room id>)."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        """Add one to the total and to the message's room, read-increment-write."""
        reader = read.get_persistence_reader()
        for association in (TOTAL, Association(AssociationModel.ROOM, message.room.id)):
            records = await reader.read_by_association(association)
            count = records[0]["count"] if records else 0
            await persistence.update_by_association(association, {"count": count + 1}, upsert=True)
