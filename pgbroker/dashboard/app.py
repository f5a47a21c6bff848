"""The dashboard's ASGI application: routes and middleware.

:func:`create_app` builds a Starlette app. Its pages are sync functions
(:mod:`pgbroker.dashboard.pages`) that Starlette runs in its thread pool,
reading through :class:`pgbroker.dashboard.web.Settings`.

Layers, outermost first: the security headers (every response), the token
check when a token is set (:mod:`pgbroker.dashboard.auth`), then the routes.
Actions (forms that change something) are off unless ``actions=True``,
which needs a token. The actions (:mod:`pgbroker.dashboard.actions`: replay
or drop dead letters, send a durable event, enable or disable a beat entry)
are POST routes that call ``web.check_form`` (actions on, the CSRF checks of
:mod:`pgbroker.dashboard.csrf`; a refusal is a 403 page), check that the
database role may write, act, and ``web.log_action`` (who did what).
"""

from __future__ import annotations

import psycopg
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgbroker.dashboard import actions as actions_mod
from pgbroker.dashboard import auth, csrf, pages
from pgbroker.dashboard.pool import Pool
from pgbroker.dashboard.web import Settings, templates
from pgbroker.errors import ConfigurationError, NotFound, PgBrokerError
from pgbroker.options import schema_name
from pgbroker.urls import to_conninfo

#: Scripts and styles come from the package only (htmx is vendored), and no
#: page may be framed. SVG charts use presentation attributes, not styles.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


def create_app(
    url: str,
    *,
    schema: str = "pgbroker",
    actions: bool = False,
    token: str | None = None,
    refresh: float = 5.0,
) -> Starlette:
    """The dashboard as an ASGI application (see pgbroker.dashboard)."""
    to_conninfo(url)  # a malformed URL fails here, its password masked
    schema = schema_name("", "schema", schema)
    if actions and not token:
        raise ConfigurationError(
            "dashboard actions need authentication: give a token (--token or "
            "PGBROKER_DASHBOARD_TOKEN), or leave actions off"
        )
    if refresh <= 0:
        raise ConfigurationError(f"refresh must be greater than 0, got {refresh:g}")
    settings = Settings(
        url=url,
        schema=schema,
        actions=actions,
        token=token,
        refresh=refresh,
        pool=Pool(url, schema),
        csrf_secret=csrf.secret_for(token),
    )
    middleware = [Middleware(SecurityHeaders)]
    if token:
        middleware.append(Middleware(auth.RequireToken, token=token))
    app = Starlette(
        routes=[
            Route("/", pages.overview, name="overview"),
            Route("/partials/overview", pages.overview_live, name="overview_live"),
            Route("/tasks", pages.tasks, name="tasks"),
            Route("/task", pages.task, name="task"),
            Route("/task/value", pages.task_value, name="task_value"),
            Route("/dead-letters", pages.dead_letters, name="dead_letters"),
            Route("/dead-letter", pages.dead_letter, name="dead_letter"),
            Route("/redeliveries", pages.redeliveries, name="redeliveries"),
            Route("/beat", pages.beat, name="beat"),
            Route("/durable", pages.durable_runs, name="durable"),
            # Actions: refused (403) unless actions are on (pgbroker.dashboard.actions).
            Route(
                "/dead-letters/replay",
                actions_mod.replay_dead_letters,
                methods=["POST"],
                name="replay_dead_letters",
            ),
            Route(
                "/dead-letters/drop",
                actions_mod.drop_dead_letters,
                methods=["POST"],
                name="drop_dead_letters",
            ),
            Route("/durable/event", actions_mod.send_durable_event, methods=["POST"], name="event"),
            Route(
                "/beat/enable", actions_mod.enable_beat_entry, methods=["POST"], name="beat_enable"
            ),
            Route(
                "/beat/disable",
                actions_mod.disable_beat_entry,
                methods=["POST"],
                name="beat_disable",
            ),
            Mount(
                "/static",
                app=StaticFiles(packages=[("pgbroker.dashboard", "static")]),
                name="static",
            ),
        ],
        middleware=middleware,
        exception_handlers={
            NotFound: pages.not_found,
            csrf.CsrfError: pages.forbidden,
            actions_mod.Refused: pages.forbidden,
            actions_mod.BadForm: pages.bad_request,
            PgBrokerError: pages.failed,
            psycopg.Error: pages.failed,
        },
    )
    app.state.dashboard = settings
    app.state.templates = templates()
    return app


class SecurityHeaders:
    """Add SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
