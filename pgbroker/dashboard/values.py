"""Task data as text for the pages: JSON-like, cut when large.

Values are rendered to plain strings here and escaped by the templates
(Jinja2 autoescape): nothing from task data is ever marked safe.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any

from pgbroker.cli.options import format_age as age
from pgbroker.cli.options import format_ago as ago

__all__ = ["Shown", "age", "ago", "as_text", "short", "shown", "when"]

#: Characters of a value shown in a page; the rest behind a link.
SHOWN_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class Shown:
    text: str
    #: The whole text is longer than what is shown.
    truncated: bool
    #: Characters of the whole text.
    size: int


def as_text(value: Any) -> str:
    """``value`` as readable text: strings as they are, the rest as JSON
    (indented), what JSON cannot hold by its ``str``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def shown(value: Any, limit: int = SHOWN_CHARS) -> Shown:
    text = as_text(value)
    if len(text) <= limit:
        return Shown(text, False, len(text))
    return Shown(text[:limit], True, len(text))


def short(value: Any, limit: int = 120) -> str:
    """One line, for a table cell."""
    text = " ".join(as_text(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def when(at: datetime | None) -> str:
    """A time as UTC, to the second."""
    if at is None:
        return "-"
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def when_ms(at: datetime | None) -> str:
    """A time as UTC, to the millisecond (a timeline's steps are often
    within one second)."""
    if at is None:
        return "-"
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
