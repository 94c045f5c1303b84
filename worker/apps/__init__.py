"""The handler contract (App and the I* protocols) and every accessor a handler is handed: read (persistence, settings, users, rooms, messages), persistence, modify, http."""
