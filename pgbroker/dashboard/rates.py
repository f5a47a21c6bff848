"""Messages published per minute, from samples of the message id sequence.

The broker keeps no publish log: an acked message is deleted, and
published_task records only the tasks a running task publishes (for
deduplication). What counts every message ever stored is the message id
sequence (``messages_stored_total`` of :func:`pgbroker.operations.admin.status`,
what ``pgbroker top`` samples). The overview samples it at each refresh and
keeps the samples in this process for an hour or so: the count of a minute
is the difference between the last samples before its start and its end.
Minutes before the first sample are unknown (``None``): the series starts
when the dashboard was first opened, and has holes where no page was open
for longer than :data:`MAX_GAP`.

A message routed to several queues is stored once per queue and counts
once per queue.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from datetime import datetime, timedelta

#: Samples kept per database and schema (at one per refresh of 5 s: 2 hours).
KEEP = 1500
#: Two samples further apart than this say nothing about the minutes between.
MAX_GAP = timedelta(minutes=3)

_lock = threading.Lock()
_samples: dict[tuple[str, str], deque[tuple[datetime, int]]] = {}


def record(key: tuple[str, str], at: datetime, total: int | None) -> None:
    """Keep one sample of the sequence (None: nothing stored yet, 0)."""
    with _lock:
        samples = _samples.setdefault(key, deque(maxlen=KEEP))
        if samples and at <= samples[-1][0]:
            return
        samples.append((at, total or 0))


def forget(key: tuple[str, str]) -> None:
    with _lock:
        _samples.pop(key, None)


def per_minute(key: tuple[str, str], minutes: list[datetime]) -> list[int | None]:
    """Messages stored in each minute starting at ``minutes`` (as reported
    by the samples), None where the samples do not tell."""
    with _lock:
        samples = list(_samples.get(key, ()))
    if not samples:
        return [None] * len(minutes)
    times = [at for at, _ in samples]
    out: list[int | None] = []
    for start in minutes:
        end = start + timedelta(minutes=1)
        i = bisect.bisect_right(times, start) - 1  # the last sample at or before start
        j = bisect.bisect_right(times, end) - 1  # the last sample at or before end
        if j < 0 or times[j] < start:
            out.append(None)  # no sample in the minute: no page was open
            continue
        if i < 0:
            i = 0  # the first sample falls in this minute: count from it
        elif start - times[i] > MAX_GAP:
            i = bisect.bisect_left(times, start)  # stale: count from the minute's first
        out.append(max(0, samples[j][1] - samples[i][1]))
    return out
