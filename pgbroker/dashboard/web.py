"""What every page shares: the app's settings, the database, rendering.

:class:`Settings` is what :func:`pgbroker.dashboard.create_app` was given,
kept in the app's state; its :meth:`Settings.run` runs a page's reads on a
connection of the app's pool (:mod:`pgbroker.dashboard.pool`), opened on
first use.
:func:`render` fills a template with what every page shows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from pgbroker.dashboard import auth, csrf, values
from pgbroker.dashboard.pool import Pool
from pgbroker.logs import recovery
from pgbroker.urls import mask_password, redact

logger = logging.getLogger("pgbroker.dashboard")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one dashboard app serves, and how."""

    url: str = dataclasses.field(repr=False)
    schema: str
    actions: bool
    token: str | None = dataclasses.field(repr=False)
    #: Seconds between two refreshes of the overview's live parts.
    refresh: float
    pool: Pool = dataclasses.field(repr=False, compare=False)
    #: Signs the forms' CSRF tokens (pgbroker.dashboard.csrf.secret_for).
    csrf_secret: bytes = dataclasses.field(repr=False)

    @property
    def where(self) -> str:
        """The database URL, its password (if any) shown as ``**``."""
        return mask_password(self.url)

    def run(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run ``fn`` on a connection of the app's pool (once more if that
        one was dead)."""
        return self.pool.run(fn)

    def act(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run an action's ``fn`` once on a connection of the app's pool (no
        retry: a write is not repeated behind the user's back)."""
        with self.pool.get().connection() as conn:
            return fn(conn)

    def check(self) -> None:
        """Connect now: a wrong URL, a server down or a schema not migrated
        raises pgbroker's clear error here rather than on the first page."""
        self.pool.get()


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.dashboard
    return settings


def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("pgbroker.dashboard", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["v"] = values
    return env


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    """A page: ``template`` with ``context`` and what every page shows."""
    settings = settings_of(request)
    env: Environment = request.app.state.templates
    html = env.get_template(template).render(
        request=request,
        base=str(request.scope.get("root_path", "")).rstrip("/"),
        schema=settings.schema,
        where=settings.where,
        actions=settings.actions,
        refresh=settings.refresh,
        user=request.scope.get(auth.USER_KEY),
        csrf_field=csrf.FIELD,
        csrf_token=csrf.token_for(settings.csrf_secret, request.scope.get(auth.USER_KEY)),
        **context,
    )
    return HTMLResponse(html, status_code=status_code)


def safe_message(request: Request, exc: BaseException) -> str:
    """An error's text for a page: one line, the password redacted."""
    return " ".join(redact(str(exc), settings_of(request).url).split())


def log_action(request: Request, action: str, **fields: Any) -> None:
    """One log line per action a user took (pgbroker.dashboard, INFO), with
    who did it: the ``pgbroker_action`` field, ``user``, and ``fields`` (those
    that are None left out)."""
    user = request.scope.get(auth.USER_KEY) or "-"
    details = ", ".join(f"{k}={v!r}" for k, v in fields.items() if v is not None)
    logger.info(
        "dashboard: %s by %s (%s)%s",
        action,
        user,
        request.client.host if request.client else "?",
        f": {details}" if details else "",
        extra=recovery(action, user=user, **fields),
    )


def check_form(request: Request, submitted: str | None) -> None:
    """Refuse an action (csrf.CsrfError) unless actions are on and the form
    comes from one of the dashboard's own pages."""
    settings = settings_of(request)
    if not settings.actions:
        raise csrf.CsrfError("actions are off: start the dashboard with --actions and a token")
    csrf.check(request, settings.csrf_secret, request.scope.get(auth.USER_KEY), submitted)
