"""Where a consumer's next claim in a queue starts.

A claim takes a queue's ready messages in service order: priority 9
first, then oldest (lowest id) first. Scanning from the start of the queue,
it would step over the index entries of every message claimed before it
that VACUUM has not removed yet. Each such entry costs a visit to the
table, and while a long transaction anywhere in the database pins the xmin
horizon, VACUUM removes none of them: after ten minutes at 200 messages a
second a claim stepped over 120,000 (docs/benchmarks.md, the ``longtx``
rows). So each consumer keeps, per queue, a *position* in service order
before which it knows of no ready message, and claims from there (``claim``
in queries.sql):

* after a claim that got fewer messages than it asked for, nothing was
  ready from where it started: the position is the end of the queue;
* after a claim that got all it asked for, it is just after its last row;
* a publish NOTIFYs the queue's name and then, in a second notification,
  the place of its first new message (``queue\\n<priority> <id>``): the
  position moves back there if that is earlier. A message committed later
  than another with a higher id (two publishers at once, or a publish in
  a long transaction) is found so;
* a NOTIFY of the queue's name alone (a message made ready again:
  requeued, recovered from a dead consumer, promoted from delayed, given
  back; or a publish by an older pgbroker) sends the next claim over the
  whole queue;
* and every ``FULL_CLAIM_EVERY`` seconds a claim scans the whole queue
  anyway: a message that another consumer's claim had locked (SKIP LOCKED
  passes over it) and that is ready again because that claim failed
  comes with no NOTIFY.

A position is held as its sort key ``(-priority, id)``: the smaller key
comes first in service order.
"""

from __future__ import annotations

import time

#: A claim scans the whole queue at least this often (seconds), see above.
FULL_CLAIM_EVERY = 2.0

Position = tuple[int, int]

#: Before every message: priority 10 is above the highest (9).
WHOLE_QUEUE: Position = (-10, 0)
#: After every message: priority -1 is below the lowest (0).
END: Position = (1, 0)


def claim_params(position: Position) -> dict[str, int]:
    """The ``claim`` statement's parameters for a claim from ``position``."""
    return {"from_priority": -position[0], "from_id": position[1]}


class ClaimCursors:
    """The positions of one consumer session, by queue (missing: the whole
    queue), and the NOTIFYs that move them."""

    def __init__(self) -> None:
        self._positions: dict[str, Position] = {}
        self._whole_at: dict[str, float] = {}
        # A queue's name just notified, by (backend pid, queue): if the next
        # notification is the place of that publish's message, the name
        # was only its companion, not a message made ready again.
        self._named: tuple[int, str] | None = None

    def notified(self, pid: int, payload: str, attached: set[str]) -> str | None:
        """Take a notification of the queue channel; return the attached
        queue that may have ready messages now, if any."""
        if payload in attached:
            self._settle()
            self._named = (pid, payload)
            return payload
        queue, newline, place = payload.rpartition("\n")
        if not newline or queue not in attached:
            self._settle()
            return None
        if self._named == (pid, queue):
            self._named = None  # the name's companion: a publish
        else:
            self._settle()
        try:
            priority, message_id = (int(part) for part in place.split(" "))
        except ValueError:
            self._positions.pop(queue, None)
            return queue
        self._move_back(queue, (-priority, message_id))
        return queue

    def start(self, queue: str) -> Position:
        """Where the next claim in ``queue`` starts. Until ``claimed`` is
        called, notifications move the position back from the end."""
        self._settle()
        position = self._positions.get(queue, WHOLE_QUEUE)
        now = time.monotonic()
        if now - self._whole_at.get(queue, -FULL_CLAIM_EVERY) >= FULL_CLAIM_EVERY:
            position = WHOLE_QUEUE
        if position == WHOLE_QUEUE:
            self._whole_at[queue] = now
        self._positions[queue] = END
        return position

    def claimed(self, queue: str, places: list[Position], limit: int) -> None:
        """A claim got the messages at ``places`` (asked for ``limit``)."""
        if len(places) < limit:
            after = END
        else:
            last = max(places)
            after = (last[0], last[1] + 1)
        self._move_back(queue, after)

    def rescan(self, queue: str) -> None:
        """The next claim scans the whole queue: a claim failed (what it
        would have taken is still there), or the queue was not consumed
        (its NOTIFYs went unheard)."""
        self._positions.pop(queue, None)

    def rescan_all(self) -> None:
        """A claim's commit failed (its queue is not known here)."""
        self._positions.clear()
        self._named = None

    def _move_back(self, queue: str, position: Position) -> None:
        self._positions[queue] = min(self._positions.get(queue, WHOLE_QUEUE), position)

    def _settle(self) -> None:
        """A queue's name notified alone: the next claim scans it whole."""
        if self._named is not None:
            self._positions.pop(self._named[1], None)
            self._named = None
