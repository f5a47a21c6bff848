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
* a publish NOTIFYs the place of its first new message in the queue
  (``queue\\n<priority> <id>``): the position moves back there if that is
  earlier. A message committed later than another with a higher id (two
  publishers at once, or a publish in a long transaction) is found so;
* a NOTIFY of the queue's name (a message made ready again: requeued,
  recovered from a dead consumer, promoted from delayed, given back) sends
  the next claim over the whole queue;
* and every ``FULL_CLAIM_EVERY`` seconds a claim scans the whole queue
  anyway: a message that another consumer's claim had locked (SKIP LOCKED
  passes over it) and that is ready again because that claim failed
  comes with no NOTIFY.

A position is held as its sort key ``(-priority, id)``: the smaller key
comes first in service order.

Who claims at once. A publish's place may name one consumer
(``queue\n<priority> <id> <consumer>``): one of the queue's consumers that
wait for a wake-up, at random (020_waiting_consumers.sql). Only that one
claims at once; every other consumer of the queue moves its position back
as for any place, and claims ``WAKE_FALLBACK`` seconds later unless it
claimed from the queue meanwhile, so a message whose named consumer cannot
claim it (stopped, dead, busy) waits that long at most while others idle.
A named consumer that cannot take the message (its window is full, or its
full claim stopped before the place) passes the place on to everyone
(``wake_consumers`` in queries.sql).

A publish sends the place alone, so a name always means a message made
ready again. Until 2026-12-07 (never released) the queue's name went first,
for consumers that woke on names only.
"""

from __future__ import annotations

import time

#: A claim scans the whole queue at least this often (seconds), see above.
FULL_CLAIM_EVERY = 2.0

#: A consumer that heard a publish name another consumer claims from that
#: queue this long after (seconds), unless it claimed from it meanwhile.
WAKE_FALLBACK = 1.0

#: A named consumer passes on a wake-up it cannot act on only if it heard a
#: publish name another consumer of the queue within this many seconds:
#: otherwise no other consumer waits, and it claims again itself when it
#: has room (a single consumer, or all of them busy).
OTHERS_WAITED_WITHIN = 2 * WAKE_FALLBACK

Position = tuple[int, int]

#: Before every message: priority 10 is above the highest (9).
WHOLE_QUEUE: Position = (-10, 0)
#: After every message: priority -1 is below the lowest (0).
END: Position = (1, 0)


def claim_params(position: Position) -> dict[str, int]:
    """The ``claim`` statement's parameters for a claim from ``position``."""
    return {"from_priority": -position[0], "from_id": position[1]}


def place_payload(queue: str, position: Position) -> str:
    """A NOTIFY payload that wakes every consumer of ``queue`` and moves
    their positions back to ``position``."""
    return f"{queue}\n{-position[0]} {position[1]}"


class ClaimCursors:
    """The positions of one consumer session, by queue (missing: the whole
    queue), the NOTIFYs that move them, and the queues to claim from now."""

    def __init__(self) -> None:
        self._positions: dict[str, Position] = {}
        self._whole_at: dict[str, float] = {}
        self._woken: set[str] = set()  # to claim from now
        # When to claim from a queue whose publishes named other consumers.
        self._fallback_at: dict[str, float] = {}
        # The first and the last place named for this consumer, by queue:
        # since the last claim there started, and for the claim under way.
        self._mine: dict[str, tuple[Position, Position]] = {}
        self._claiming_mine: dict[str, tuple[Position, Position]] = {}
        # When a publish last named another consumer, by queue.
        self._others_named_at: dict[str, float] = {}

    def notified(self, payload: str, attached: set[str], consumer_id: int | None = None) -> bool:
        """Take a notification of the queue channel; say whether it was
        about an attached queue (``take_woken`` then says what to claim)."""
        if payload in attached:
            self._positions.pop(payload, None)  # the whole queue
            self._woken.add(payload)
            return True
        queue, newline, place = payload.rpartition("\n")
        if not newline or queue not in attached:
            return False
        try:
            numbers = [int(part) for part in place.split(" ")]
            if len(numbers) not in (2, 3):
                raise ValueError(place)
        except ValueError:
            self._positions.pop(queue, None)
            self._woken.add(queue)
            return True
        position = (-numbers[0], numbers[1])
        self._move_back(queue, position)
        named = numbers[2] if len(numbers) == 3 else None
        if named is None or named == consumer_id:
            self._woken.add(queue)
            if named is not None:
                first, last = self._mine.get(queue, (position, position))
                self._mine[queue] = (min(first, position), max(last, position))
        else:
            now = time.monotonic()
            self._fallback_at.setdefault(queue, now + WAKE_FALLBACK)
            self._others_named_at[queue] = now
        return True

    def take_woken(self) -> set[str]:
        """The queues to claim from now: woken by a notification or by
        their fallback time."""
        if not (self._woken or self._fallback_at):
            return set()  # (at every turn of Celery's event loop)
        now = time.monotonic()
        for queue, at in list(self._fallback_at.items()):
            if at <= now:
                del self._fallback_at[queue]
                self._woken.add(queue)
        woken, self._woken = self._woken, set()
        return woken

    def next_fallback(self) -> float | None:
        """When the next fallback claim is due (monotonic), if any."""
        return min(self._fallback_at.values(), default=None)

    def start(self, queue: str) -> Position:
        """Where the next claim in ``queue`` starts. Until ``claimed`` is
        called, notifications move the position back from the end."""
        # This claim covers every place notified so far.
        self._woken.discard(queue)
        self._fallback_at.pop(queue, None)
        if queue in self._mine:
            self._claiming_mine[queue] = self._mine.pop(queue)
        position = self._positions.get(queue, WHOLE_QUEUE)
        now = time.monotonic()
        if now - self._whole_at.get(queue, -FULL_CLAIM_EVERY) >= FULL_CLAIM_EVERY:
            position = WHOLE_QUEUE
        if position == WHOLE_QUEUE:
            self._whole_at[queue] = now
        self._positions[queue] = END
        return position

    def claimed(self, queue: str, places: list[Position], limit: int) -> Position | None:
        """A claim got the messages at ``places`` (asked for ``limit``).
        When it was full and a place named for this consumer lies after it,
        returns where the claim stopped: for the others to claim from."""
        if len(places) < limit:
            after = END
        else:
            last = max(places)
            after = (last[0], last[1] + 1)
        self._move_back(queue, after)
        mine = self._claiming_mine.pop(queue, None)
        if mine is None or mine[1] < after or not self._others_wait(queue):
            return None
        return after

    def unserved(self, queue: str) -> Position | None:
        """No claim from ``queue`` now (no room): the first place named for
        this consumer there since its last claim, if any, for the others to
        claim from."""
        mine = self._mine.pop(queue, None)
        return mine[0] if mine is not None and self._others_wait(queue) else None

    def _others_wait(self, queue: str) -> bool:
        """Whether another consumer of ``queue`` was named lately: one that
        waits, to pass a wake-up on to."""
        named_at = self._others_named_at.get(queue)
        return named_at is not None and time.monotonic() - named_at < OTHERS_WAITED_WITHIN

    def rescan(self, queue: str) -> None:
        """The next claim scans the whole queue: a claim failed (what it
        would have taken is still there), or the queue was not consumed
        (its NOTIFYs went unheard)."""
        self._positions.pop(queue, None)
        self._claiming_mine.pop(queue, None)

    def rescan_all(self) -> None:
        """A claim's commit failed (its queue is not known here)."""
        self._positions.clear()
        self._claiming_mine.clear()

    def _move_back(self, queue: str, position: Position) -> None:
        self._positions[queue] = min(self._positions.get(queue, WHOLE_QUEUE), position)
