"""The status pages for the whole consumer group: ``rc-worker web``, or a worker's port with ``observability.web``.

``live`` samples offsets, the group, its members' status and the dead-letter topic in the
background; ``queries`` reads pages of the database and the topic on request; ``app`` renders
them with Jinja2 (autoescaped) under Starlette; ``security`` guards the one action that changes
anything (a re-drive) behind the configured token and a CSRF check; ``server`` runs it all in
uvicorn inside the caller's event loop.
"""
