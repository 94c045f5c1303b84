"""The status pages: a Starlette app rendering Jinja2 templates (autoescaped) from ``Live`` and the database.

Routes (all GET but the re-drive):
  /               overview: group, members, offsets and lag, events/s, dead letters, conflicts, outbox
  /partitions     each partition's owner, offsets in Kafka and in the database, its lane's state
  /dead-letters   the dead letters, newest first, filtered by app and reason, paged
  /dead-letters/redrive (POST)  a dry-run count, then the re-drive, through ``worker.tools.dlq.redrive``
  /state          an app's records, by association, paged
  /explorer       records of the event topic around an offset or a time, decoded as the worker does
  /health         each member's liveness and readiness checks
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from importlib.resources import files
from typing import Any

import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from worker import logs
from worker.config import Settings
from worker.errors import ConfigError, WorkerError
from worker.persistence.admin import redrives
from worker.persistence.store import Store
from worker.web import display, queries
from worker.web.live import Live
from worker.web.security import CSRF_COOKIE, Guard, Refused

log = structlog.get_logger("worker.web")

PAGE_SIZE = 50
# Pages forbid inline scripts and any other origin: a value that slipped past escaping still could not run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("worker.web", "templates"), autoescape=select_autoescape(default=True), enable_async=False)
    env.filters.update(printable=display.printable, pretty=display.pretty, when=display.when, ago=display.ago)
    return env


class Pages:
    """The route handlers, over one store, one ``Live`` and one ``Guard``."""

    def __init__(self, settings: Settings, store: Store, live: Live, guard: Guard) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.guard = guard
        self.env = _environment()

    # -- rendering ---------------------------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        """The page, with the CSRF cookie set if the browser has none yet."""
        cookie = request.cookies.get(CSRF_COOKIE)
        fresh = cookie is None
        cookie = cookie or self.guard.new_cookie()
        body = self.env.get_template(template).render(
            request=request,
            path=request.url.path,
            settings=self.settings,
            read_only=self.guard.read_only,
            csrf=self.guard.form_token(cookie),
            sample=self.live.sample,
            **context,
        )
        response = HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)
        if fresh:
            response.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict", path="/")
        return response

    # -- pages -------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        """Group, members, offsets, events/s, dead letters per reason, conflicts and retries per app, outbox."""
        sample = self.live.sample
        return self.render(
            request,
            "overview.html",
            rates=self.live.events_per_second(),
            reasons=self.live.dead_letters.counts("reason").most_common(20),
            redriven=self.live.ledger.size.sent,
            dead_letters=len(self.live.dead_letters.newest_first),
            apps=_app_counters(sample.members),
            backlog=await queries.outbox_backlog_by_topic(self.store),
        )

    async def partitions(self, request: Request) -> Response:
        """Per partition: owner in Kafka and in the database, offsets, lag, the lane's state."""
        kafka = self.settings.kafka
        claims = await queries.claims(self.store, kafka.group_id, kafka.topic)
        sample = self.live.sample
        rows = []
        for row in sample.offsets:
            member = sample.member_of(row.partition)
            rows.append(
                {
                    "offsets": row,
                    "member": member,
                    "claim": claims.get(row.partition),
                    "lane": member.lane(row.partition) if member else None,
                }
            )
        return self.render(request, "partitions.html", rows=rows)

    async def dead_letters(self, request: Request) -> Response:
        """The dead letters, newest first, filtered and paged; the ledger is asked about the shown page only."""
        app, reason = request.query_params.get("app") or None, request.query_params.get("reason") or None
        page = _int(request.query_params.get("page"), 1, minimum=1)
        chosen = queries.select_dead_letters(self.live.dead_letters.of_app(app), None, reason)
        shown = chosen[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        ledger = await redrives(self.store, self.settings.kafka.dead_letter_topic, [d.position for d in shown])
        claimed = self.live.ledger.claimed
        return self.render(
            request,
            "dead_letters.html",
            letters=[(letter, ledger.get(letter.position)) for letter in shown],
            total=len(chosen),
            pending=sum(1 for d in chosen if d.position not in claimed and d.truncated is None),
            page=page,
            pages=max(1, -(-len(chosen) // PAGE_SIZE)),
            app=app or "",
            reason=reason or "",
            apps=sorted(self.live.dead_letters.counts("app")),
        )

    async def redrive(self, request: Request) -> Response:
        """POST: check token and CSRF; without ``confirm``, count (dry run); with it, re-drive."""
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            self.guard.check(request.cookies.get(CSRF_COOKIE), fields.get("csrf"), fields.get("token"))
        except Refused as exc:
            log.warning("web_redrive_refused", reason=exc.reason)
            return self.render(request, "refused.html", status=403, reason=exc.reason)
        await self.live.dead_letters.refresh()
        letters = queries.chosen_for_redrive(self.live.dead_letters, fields)
        dry_run = fields.get("confirm") != "yes"
        result = await queries.redrive(self.settings, self.store, letters, dry_run=dry_run)
        if not dry_run:
            # The next page counts what is left to re-drive from the ledger: show this redrive at once.
            await self.live.ledger.refresh()
            log.info("web_redrive", sent=len(result.sent), skipped=len(result.skipped), truncated=len(result.truncated))
        return self.render(request, "redrive.html", result=result, dry_run=dry_run, fields=fields)

    async def state(self, request: Request) -> Response:
        """An app's records, by association, paged by id."""
        apps = await queries.app_ids(self.store)
        app = request.query_params.get("app") or (apps[0] if apps else "")
        association = (request.query_params.get("association") or "").strip()
        after = request.query_params.get("after") or None
        found = await queries.records_page(self.store, app, association or None, after, PAGE_SIZE) if app else None
        examples = await queries.association_models(self.store, app) if app else []
        return self.render(request, "state.html", apps=apps, app=app, association=association, after=after, found=found, examples=examples)

    async def explorer(self, request: Request) -> Response:
        """Records of the event topic around an offset or from a time, decoded."""
        params = request.query_params
        try:
            view = await queries.explore(
                self.settings.kafka,
                _int(params.get("partition"), 0, minimum=0),
                _int(params.get("offset"), None),
                params.get("time") or None,
                _int(params.get("count"), 20, minimum=1, maximum=200),
            )
        except ConfigError as exc:
            return self.render(request, "explorer.html", view=None, error=str(exc), params=params)
        return self.render(request, "explorer.html", view=view, error=None, params=params)

    async def health(self, request: Request) -> Response:
        """Each member's liveness and readiness, as its /healthz and /readyz judge them."""
        return self.render(request, "health.html")


def _app_counters(members: list[Any]) -> dict[str, Counter[str]]:
    """Per app, the counters every answering member reported, summed (each since its own start)."""
    totals: dict[str, Counter[str]] = {}
    for member in members:
        for app, counters in ((member.status or {}).get("apps") or {}).items():
            totals.setdefault(app, Counter()).update({k: int(v) for k, v in counters.items() if isinstance(v, int | float)})
    return dict(sorted(totals.items()))


def _int(text: str | None, default: Any, *, minimum: int | None = None, maximum: int | None = None) -> Any:
    try:
        value = int(text) if text not in (None, "") else default
    except ValueError:
        return default
    if value is None:
        return None
    if minimum is not None:
        value = max(minimum, value)
    return min(maximum, value) if maximum is not None else value


async def _failed(request: Request, exc: Exception) -> Response:
    pages: Pages = request.app.state.pages
    # Errors may quote a database URL or a broker's words: the configured secrets are cut out.
    reason = logs.redact(str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}")
    log.warning("web_page_failed", path=request.url.path, reason=reason)
    return pages.render(request, "refused.html", status=503, reason=f"this page could not be built: {reason}")


def create_app(settings: Settings, store: Store, live: Live, *, run_live: bool = True, owns_store: bool = False) -> Starlette:
    """The ASGI app; with ``run_live`` it samples in the background while it serves; with ``owns_store`` it closes the store at the end."""
    pages = Pages(settings, store, live, Guard(settings.web.token))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[Mapping[str, Any]]:
        try:
            if not run_live:
                yield {}
                return
            async with live.running():
                yield {}
        finally:
            if owns_store:
                await store.close()

    routes = [
        Route("/", pages.overview),
        Route("/partitions", pages.partitions),
        Route("/dead-letters", pages.dead_letters),
        Route("/dead-letters/redrive", pages.redrive, methods=["POST"]),
        Route("/dead-letters/redrive", lambda _r: RedirectResponse("/dead-letters", status_code=303), methods=["GET"]),
        Route("/state", pages.state),
        Route("/explorer", pages.explorer),
        Route("/health", pages.health),
        Mount("/static", StaticFiles(directory=str(files("worker.web") / "static")), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={WorkerError: _failed})
    app.state.pages = pages
    return app
