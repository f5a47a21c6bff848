"""The overview's chart: per-minute counts as SVG geometry.

The page draws it as inline SVG (templates/_chart.html) from the numbers
computed here: no JavaScript chart library, nothing to download.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timezone

from pgbroker.dashboard.data import Minute

WIDTH = 600
HEIGHT = 160
#: Room for the y axis labels (left) and the time labels (bottom).
LEFT = 40
BOTTOM = 20
TOP = 8


@dataclasses.dataclass(frozen=True)
class Series:
    name: str
    #: CSS class of the line (its colour, in dashboard.css).
    css: str
    #: "x,y x,y ..." for each SVG polyline: a series with unknown minutes
    #: is drawn in pieces.
    segments: list[str]
    total: int


@dataclasses.dataclass(frozen=True)
class Tick:
    x: float
    y: float
    label: str


@dataclasses.dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    plot_bottom: float
    series: list[Series]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    #: The largest count in a minute (the top of the y axis).
    peak: int


def _nice_top(peak: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... that is at least ``peak``."""
    base = 1
    while base * 10 <= peak:
        base *= 10
    return next(base * m for m in (1, 2, 5, 10) if base * m >= peak)


def per_minute(minutes: Sequence[Minute]) -> Chart:
    """Published, completed and failed tasks per minute, oldest left."""
    peak = max([0, *(max(m.published or 0, m.completed, m.failed) for m in minutes)])
    top = _nice_top(peak)
    plot_w = WIDTH - LEFT - 4
    plot_h = HEIGHT - TOP - BOTTOM
    n = max(len(minutes) - 1, 1)

    def x(i: int) -> float:
        return round(LEFT + plot_w * i / n, 1)

    def y(v: int) -> float:
        return round(TOP + plot_h * (1 - v / top), 1)

    def line(name: str, css: str, values: list[int | None]) -> Series:
        segments: list[list[str]] = [[]]
        for i, v in enumerate(values):
            if v is None:
                if segments[-1]:
                    segments.append([])
            else:
                segments[-1].append(f"{x(i)},{y(v)}")
        drawn = [" ".join(points) for points in segments if points]
        return Series(name, css, drawn, sum(v or 0 for v in values))

    series = [
        line("published", "published", [m.published for m in minutes]),
        line("completed", "completed", [m.completed for m in minutes]),
        line("failed", "failed", [m.failed for m in minutes]),
    ]
    y_ticks = [Tick(LEFT - 4, y(v), str(v)) for v in sorted({0, top // 2, top})]
    x_ticks = [
        Tick(x(i), HEIGHT - 4, minutes[i].at.astimezone(timezone.utc).strftime("%H:%M"))
        for i in range(0, len(minutes), 15)
    ]
    if minutes:
        x_ticks.append(Tick(x(len(minutes) - 1), HEIGHT - 4, "now"))
    return Chart(WIDTH, HEIGHT, LEFT, TOP + plot_h, series, y_ticks, x_ticks, peak)
