"""The status pages as an app a worker's observability endpoint serves (``observability.web: true``)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp

from worker.config import Settings
from worker.persistence.store import Store
from worker.web.app import create_app
from worker.web.live import Live


def pages_factory(settings: Settings) -> Callable[[], ASGIApp]:
    """Builds the pages in the endpoint's own thread: a store and a sampler of their own, bound to its event loop."""

    def build() -> ASGIApp:
        store = Store.from_settings(settings.persistence)
        return create_app(settings, store, Live(settings, store), owns_store=True)

    return build
