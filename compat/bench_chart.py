"""The benchmark's results drawn as one PNG (``python -m compat.bench --chart out.png``).

Needs matplotlib (the ``bench`` extra). Draws from the JSON written by
``--json`` (the same dict), so a saved run can be drawn again:
``python -m compat.bench_chart results.json out.png``.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

COLUMNS = ("pgbroker", "redis", "rabbitmq", "rabbitmq_redis")
LABELS = {
    "pgbroker": "pgbroker",
    "redis": "Redis",
    "rabbitmq": "RabbitMQ",
    "rabbitmq_redis": "RabbitMQ+Redis",
}
COLOURS = {
    "pgbroker": "#336791",
    "redis": "#d82c20",
    "rabbitmq": "#ff6600",
    "rabbitmq_redis": "#a0522d",
}


def draw(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    if "runs" in results:  # several --pg servers: the first one's
        results = results["runs"][0]
    figures = results["figures"]
    bars = [
        (key, f)
        for key, f in figures.items()
        if f["part"] != "scale" and any(c.get("median") is not None for c in f["cells"].values())
    ]
    scale = {key: f for key, f in figures.items() if f["part"] == "scale"}
    panels = len(bars) + (2 if scale else 0)
    cols = 4
    rows = max(1, math.ceil(panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (_, f) in zip(flat, bars, strict=False):
        _bar_panel(ax, f)
    if scale:
        _scale_panel(flat[len(bars)], scale, "one", "consumers on 1 queue")
        _scale_panel(flat[len(bars) + 1], scale, "spread", "consumers over 16 queues")
    for ax in flat[panels:]:
        ax.axis("off")
    env = results.get("environment", {})
    pg = env.get("postgresql", {})
    fig.suptitle(
        f"pgbroker vs Redis and RabbitMQ, {env.get('started', '')}, "
        f"{env.get('cpu_count')} cores (shared), PostgreSQL {pg.get('server_version', '?')} "
        f"synchronous_commit={pg.get('synchronous_commit', '?')} fsync={pg.get('fsync', '?')}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bar_panel(ax: Any, f: dict[str, Any]) -> None:
    keys = [k for k in COLUMNS if f["cells"].get(k, {}).get("median") is not None]
    values = [f["cells"][k]["median"] for k in keys]
    ax.bar(
        [LABELS[k] for k in keys],
        values,
        color=[COLOURS[k] for k in keys],
    )
    for i, v in enumerate(values):
        ax.annotate(_fmt(v), (i, v), ha="center", va="bottom", fontsize=8)
    if f.get("bound") is not None:
        ax.axhline(f["bound"], color="black", linestyle="--", linewidth=0.8)
    title = "\n".join(textwrap.wrap(f["label"], 42))
    if f.get("target"):
        verdict = {True: "met", False: "NOT met", None: "?"}[f.get("met")]
        title += f"\ntarget {f['target']} (dashed): {verdict}"
    ax.set_title(title, fontsize=8)
    ax.margins(y=0.15)  # room for the value labels under the title
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.tick_params(axis="y", labelsize=7)
    if values and max(values) > 50 * max(min(values), 1e-9):
        ax.set_yscale("log")  # e.g. Redis's configured one-hour visibility timeout


def _scale_panel(ax: Any, scale: dict[str, Any], layout: str, title: str) -> None:
    series: dict[str, list[tuple[int, float]]] = {}
    for key, f in scale.items():
        if not key.startswith(f"scale_{layout}_"):
            continue
        n = int(key.rsplit("_", 1)[1])
        for system, cell in f["cells"].items():
            if cell.get("median") is not None:
                series.setdefault(system, []).append((n, cell["median"]))
    for system, points in series.items():
        points.sort()
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            color=COLOURS.get(system),
            label=LABELS.get(system, system),
        )
    ax.set_xscale("log", base=2)
    counts = sorted({n for points in series.values() for n, _ in points})
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("consumers (each its own connection)", fontsize=7)
    ax.set_ylabel("msg/s, all consumers", fontsize=7)
    ax.set_ylim(bottom=0)
    ax.set_title(f"scale: {title}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


if __name__ == "__main__":
    draw(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
