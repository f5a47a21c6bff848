"""The Celery behaviours of the suite, written once for every broker and backend.

In the spirit of Kombu's ``t/integration/common.py``: one class of checks that
knows nothing about the system under test. The runner builds a
:class:`~compat.suite.context.Context` for each system (its own worker, its
own queues) and calls every scenario in order. A scenario raises
:class:`ScenarioFailure` (or any error from Celery/Kombu) to fail, raises
:class:`Skip` when it does not apply, and may return a short note for the
report. Scenarios are short: the whole suite takes about a minute per system.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from celery import chain, chord, group
from celery.exceptions import TaskRevokedError
from celery.result import GroupResult

from compat.apps.suite_app import ROUTED_QUEUES
from compat.suite.context import Context, ScenarioFailure, Skip

__all__ = ["SCENARIOS", "Behaviours", "ScenarioFailure", "Skip"]

Scenario = Callable[["Behaviours"], "str | None"]

#: Order in which each transport serves priorities, as it documents it.
#: AMQP (with x-max-priority) and pgbroker serve higher numbers first;
#: Kombu's Redis transport serves lower numbers first.
PRIORITY_ORDER = {"amqp": "higher", "postgresql": "higher", "redis": "lower"}

SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


class Behaviours:
    """Celery behaviours that every broker/backend pair should show."""

    def __init__(self, ctx: Context) -> None:
        self.c = ctx

    def t(self, name: str) -> Any:
        return self.c.task(name)

    def _worker_still_serves(self, after: str) -> None:
        probe = self.t("probe").delay(f"after {after}")
        self.c.get(probe, 20, f"a task sent after {after}")

    @scenario("basic")
    def basic(self) -> None:
        c = self.c
        result = self.t("add").delay(2, 3)
        c.equal(c.get(result, what="add(2, 3)"), 5, "add(2, 3)")
        c.equal(result.state, "SUCCESS", "state")
        by_name = c.app.send_task("compat.add", (40, 2))
        c.equal(c.get(by_name, what="send_task"), 42, "send_task('compat.add', (40, 2))")

    @scenario("retry")
    def retry(self) -> str:
        c = self.c
        result = self.t("retry_countdown").delay(c.path("retry"), 2, 1.0)
        times = c.get(result, 30, "retry_countdown")
        c.equal(len(times), 3, "attempts (1 + 2 retries)")
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
        c.check(all(gap >= 0.9 for gap in gaps), f"gaps {gaps} s between attempts, countdown 1 s")
        c.equal(result.retries, 2, "result.retries")
        return f"gaps {gaps} s"

    @scenario("eta_expires")
    def eta_expires(self) -> str:
        c = self.c
        sent = time.time()
        eta = self.t("probe").apply_async(("eta",), countdown=3)
        # Due after it expires: the worker holds it until the ETA, then finds
        # it expired.
        ran_marker = c.path("expired")
        expired = self.t("touch").apply_async((ran_marker,), countdown=2, expires=1)
        # Expires while waiting in a queue no worker consumes yet.
        backlog_marker = c.path("backlog")
        backlog = self.t("touch").apply_async((backlog_marker,), queue=c.names.expiry, expires=1)
        sentinel = self.t("probe").apply_async(("sentinel",), queue=c.names.expiry)

        started = c.get(eta, 20, "countdown=3 task")["started"]
        delay = started - sent
        c.check(delay >= 2.9, f"countdown=3 task started after {delay:.2f} s")
        c.check(delay < 15, f"countdown=3 task started only after {delay:.1f} s")

        error = c.get_error(expired, 15, "expired task")
        c.check(isinstance(error, TaskRevokedError), f"expired task: {error!r}, not revoked")
        c.equal(expired.state, "REVOKED", "expired task state")
        c.check(not os.path.exists(ran_marker), "the expired task ran")

        time.sleep(max(0.0, sent + 1.5 - time.time()))
        c.add_consumer(c.names.expiry)
        c.get(sentinel, 20, "task queued after the expired one")
        c.check(not os.path.exists(backlog_marker), "a task that expired in the queue ran")
        return f"ETA delay {delay:.2f} s; expired in queue: state {backlog.state}"

    @scenario("revoke")
    def revoke(self) -> None:
        c = self.c
        release = c.path("release")
        blockers = []
        try:
            for i in range(2):
                started = c.path(f"blocker{i}")
                blockers.append((started, self.t("block").delay(started, release)))
            for started, _ in blockers:
                c.wait_file(started, 15, "both pool processes to be busy")
            victim_marker = c.path("victim")
            victim = self.t("touch").delay(victim_marker)

            def reserved() -> bool:
                replies = c.inspect().reserved() or {}
                return any(r["id"] == victim.id for r in replies.get(c.nodename, []))

            c.wait_until(reserved, 15, "the worker to reserve the queued task", interval=0.2)
            reply = c.control("revoke", task_id=victim.id)
            c.check("ok" in reply, f"revoke reply {reply}")
            c.wait_until(
                lambda: victim.state == "REVOKED", 10, "the queued task's state to be REVOKED"
            )
        finally:
            Path(release).touch()
        for _, blocker in blockers:
            c.equal(c.get(blocker, 25, "blocker"), "released", "blocker")
        self._worker_still_serves("the revoke")
        c.check(not os.path.exists(victim_marker), "the revoked task ran")
        error = c.get_error(victim, 5, "revoked task")
        c.check(isinstance(error, TaskRevokedError), f"revoked task: {error!r}")

        started = c.path("running")
        release = c.path("release-running")
        try:
            running = self.t("block").delay(started, release)
            c.wait_file(started, 15, "the task to start")
            reply = c.control("revoke", task_id=running.id, terminate=True, signal="SIGTERM")
            c.check("ok" in reply, f"revoke(terminate=True) reply {reply}")
            error = c.get_error(running, 15, "terminated task")
            c.check(isinstance(error, TaskRevokedError), f"terminated task: {error!r}")
            c.equal(running.state, "REVOKED", "terminated task state")
        finally:
            Path(release).touch()
        self._worker_still_serves("terminate")

    @scenario("priority")
    def priority(self) -> str:
        c = self.c
        queue = c.names.priority
        # Interleaved low and high priorities, all waiting in a queue that no
        # worker consumes yet; then the worker starts consuming it.
        sent = []
        for i in range(8):
            prio = 9 if i % 2 else 0
            sent.append(
                self.t("probe").apply_async(
                    ((prio, i),), {"sleep": 0.2}, queue=queue, priority=prio
                )
            )
        c.add_consumer(queue)
        runs = sorted((c.get(r, 30, "priority task") for r in sent), key=lambda r: r["started"])
        first_half = {run["label"][0] for run in runs[:4]}
        observed = {
            frozenset({9}): "higher",
            frozenset({0}): "lower",
        }.get(frozenset(first_half), "none")
        order = " ".join(str(run["label"][0]) for run in runs)
        documented = PRIORITY_ORDER.get(c.driver_type)
        if documented is None:
            raise Skip(f"no documented order for {c.driver_type}; observed {observed} first")
        c.check(
            observed == documented,
            f"{c.driver_type} documents {documented} numbers first; run order {order}",
        )
        return f"{observed} numbers first (run order {order})"

    @scenario("rate_limit")
    def rate_limit(self) -> str:
        c = self.c
        sent = [self.t("rate_limited").delay(i) for i in range(5)]
        starts = sorted(c.get(r, 30, "rate_limited task")["started"] for r in sent)
        span = starts[-1] - starts[0]
        # rate_limit='4/s': the 5 tasks start 0.25 s apart, 1 s in all.
        c.check(span >= 0.8, f"5 tasks at rate_limit 4/s started within {span:.2f} s")
        return f"5 tasks at 4/s over {span:.2f} s"

    @scenario("time_limits")
    def time_limits(self) -> None:
        c = self.c
        soft = self.t("soft_limited").delay()
        hard = self.t("hard_limited").delay()
        c.equal(c.get(soft, 20, "soft_time_limit=1 task"), "soft limit caught", "soft limit")
        error = c.get_error(hard, 20, "time_limit=1 task")
        c.equal(type(error).__name__, "TimeLimitExceeded", "hard limit error")
        c.equal(hard.state, "FAILURE", "hard limit state")
        self._worker_still_serves("a hard time limit")

    @scenario("acks_late_lost_worker")
    def acks_late_lost_worker(self) -> str:
        c = self.c
        # acks_late + reject_on_worker_lost: the task SIGKILLs its own pool
        # process on the first attempt; the message must come back.
        result = self.t("lose_worker").delay(c.path("lost"))
        outcome = c.get(result, 60, "lose_worker")
        c.equal(outcome["attempts"], 2, "attempts")
        c.check(len(set(outcome["pids"])) == 2, f"both attempts in pid {outcome['pids'][0]}")
        return f"redelivered flag: {outcome['redelivered']}"

    @scenario("chain")
    def chain_links(self) -> None:
        c = self.c
        result = (self.t("add").s(1, 2) | self.t("add").s(3) | self.t("mul").s(2))()
        c.equal(c.get(result, 20, "chain"), 12, "(1 + 2 + 3) * 2")
        c.equal(c.get(result.parent, 5, "chain parent"), 6, "second link")
        c.equal(c.get(result.parent.parent, 5, "chain root"), 3, "first link")

    @scenario("group")
    def group_parts(self) -> None:
        c = self.c
        result = group(self.t("add").s(i, i) for i in range(10))()
        c.equal(c.get(result, 30, "group"), [i * 2 for i in range(10)], "group of 10 adds")
        if c.backend_name == "rpc":
            return  # the rpc backend cannot save groups
        result.save()
        restored = GroupResult.restore(result.id, app=c.app)
        c.check(restored is not None, "GroupResult.restore found nothing")
        c.equal([r.id for r in restored.results], [r.id for r in result.results], "restored ids")

    @scenario("chord")
    def chord_body(self) -> None:
        c = self.c
        if c.backend_name == "rpc":
            raise Skip("the rpc backend does not support chords")
        add = self.t("add")
        result = chord(add.s(i, i) for i in range(5))(self.t("xsum").s())
        c.equal(c.get(result, 30, "chord"), 20, "sum of the header")
        failing = chord([add.s(1, 1), self.t("fail").si("header part failed")])(self.t("xsum").s())
        error = c.get_error(failing, 30, "chord with a failing part")
        c.equal(type(error).__name__, "ChordError", "error of a chord whose header failed")
        c.check("header part failed" in str(error), f"ChordError without the cause: {error}")

    @scenario("nested_canvas")
    def nested_canvas(self) -> None:
        c = self.c
        if c.backend_name == "rpc":
            raise Skip("the rpc backend does not support chords")
        add, mul, xsum = self.t("add"), self.t("mul"), self.t("xsum")
        # A chord in a chain: 2 -> [2, 3, 4] -> 9 -> 109.
        chord_in_chain = chain(
            add.s(1, 1), chord([add.s(0), add.s(1), add.s(2)], xsum.s()), add.s(100)
        )()
        c.equal(c.get(chord_in_chain, 30, "chord in chain"), 109, "chord in chain")
        # Chains in a chord header: (1+1)*3 + (2+2)*3.
        chains_in_header = chord(
            [chain(add.s(1, 1), mul.s(3)), chain(add.s(2, 2), mul.s(3))], xsum.s()
        )()
        c.equal(c.get(chains_in_header, 30, "chain in chord header"), 18, "chains in header")
        group_of_chains = group(chain(add.s(i, i), mul.s(10)) for i in range(3))()
        c.equal(c.get(group_of_chains, 30, "group of chains"), [0, 20, 40], "group of chains")

    @scenario("errback")
    def errback(self) -> None:
        c = self.c
        fail = self.t("fail")
        new_path, old_path, link_path = c.path("errback"), c.path("errback-id"), c.path("link")
        new_style = fail.apply_async(
            ("boom a",),
            link_error=self.t("record_error").s(new_path),
            link=self.t("touch").si(link_path),
        )
        old_style = fail.apply_async(("boom b",), link_error=self.t("record_error_id").s(old_path))
        c.get_error(new_style, 15, "failing task")
        c.get_error(old_style, 15, "failing task")

        record = json.loads(c.wait_file(new_path, 15, "errback(request, exc, traceback)"))
        c.equal(record["task_id"], new_style.id, "errback request.id")
        c.equal((record["exc_type"], record["exc"]), ("ValueError", "boom a"), "errback exc")
        c.check(record["has_traceback"], "errback got no traceback")
        record = json.loads(c.wait_file(old_path, 15, "errback task(task_id)"))
        c.equal(record["task_id"], old_style.id, "errback task's task_id")
        c.equal(record["state"], "FAILURE", "failed task's state seen by the errback")
        c.check("boom b" in record["exc"], f"errback saw {record['exc']}")

        chain_path = c.path("chain-errback")
        failing_chain = (self.t("add").s(1, 1) | fail.si("boom c")).on_error(
            self.t("record_error").s(chain_path)
        )()
        c.get_error(failing_chain, 15, "failing chain")
        record = json.loads(c.wait_file(chain_path, 15, "the chain's errback"))
        c.equal(record["task_id"], failing_chain.id, "chain errback request.id")
        c.check(not os.path.exists(link_path), "the success link ran after a failure")

    @scenario("custom_state")
    def custom_state(self) -> None:
        c = self.c
        release = c.path("progress-release")
        try:
            result = self.t("progress").delay(release)
            c.wait_until(lambda: result.state == "PROGRESS", 15, "state PROGRESS", interval=0.1)
            c.equal(result.info, {"step": 1, "of": 2, "text": "half ✓"}, "PROGRESS meta")
        finally:
            Path(release).touch()
        c.equal(c.get(result, 20, "progress"), "done", "result")
        c.equal(result.state, "SUCCESS", "final state")

    @scenario("inspect_control")
    def inspect_control(self) -> str:
        c = self.c
        replies = c.app.control.ping(destination=[c.nodename], timeout=5)
        c.check(
            any(r.get(c.nodename) == {"ok": "pong"} for r in replies or []),
            f"ping replies {replies}",
        )
        inspect = c.inspect()
        stats = (inspect.stats() or {}).get(c.nodename) or {}
        c.equal(stats.get("pool", {}).get("max-concurrency"), 2, "stats pool max-concurrency")
        registered = set((inspect.registered() or {}).get(c.nodename) or [])
        missing = {f"compat.{n}" for n in ("add", "probe", "block", "lose_worker")} - registered
        c.check(not missing, f"inspect registered lacks {sorted(missing)}")

        started, release = c.path("active"), c.path("active-release")
        try:
            blocker = self.t("block").delay(started, release)
            c.wait_file(started, 15, "the task to start")
            active = (inspect.active() or {}).get(c.nodename) or []
            c.check(
                any(a.get("id") == blocker.id for a in active),
                f"inspect active: {[a.get('id') for a in active]}, not {blocker.id}",
            )
        finally:
            Path(release).touch()
        c.get(blocker, 20, "blocker")

        reply = c.control("rate_limit", task_name="compat.ctl_limited", rate_limit="2/s")
        c.check("ok" in reply, f"control rate_limit reply {reply}")
        sent = [self.t("ctl_limited").delay(i) for i in range(3)]
        starts = sorted(c.get(r, 30, "ctl_limited task")["started"] for r in sent)
        span = starts[-1] - starts[0]
        c.check(span >= 0.8, f"3 tasks after control rate_limit 2/s started within {span:.2f} s")
        return f"rate_limit 2/s set by control: 3 tasks over {span:.2f} s"

    @scenario("events")
    def events(self) -> None:
        c = self.c
        seen: dict[str, set[str]] = {}
        ready = threading.Event()
        failure: list[BaseException] = []

        def on_event(event: dict[str, Any]) -> None:
            key = event.get("uuid") or event.get("hostname")
            if key:
                seen.setdefault(key, set()).add(event["type"])

        def heard_worker() -> bool:
            # Ask for a heartbeat event until one arrives: some transports
            # (Redis pub/sub) subscribe only after the receiver's first read,
            # so "consuming" alone does not prove the receiver is listening.
            c.app.control.broadcast("heartbeat", destination=[c.nodename])
            return "worker-heartbeat" in seen.get(c.nodename, set())

        with c.app.connection_for_read() as conn:
            receiver = c.app.events.Receiver(conn, handlers={"*": on_event})
            receiver.on_consume_ready = lambda *args, **kwargs: ready.set()

            def capture() -> None:
                try:
                    receiver.capture(limit=None, timeout=None, wakeup=False)
                except BaseException as exc:
                    failure.append(exc)
                    ready.set()

            thread = threading.Thread(target=capture, name="compat-events", daemon=True)
            thread.start()
            try:
                c.check(ready.wait(15), "the event receiver did not start consuming")
                c.check(not failure, f"event receiver failed: {failure and failure[0]!r}")
                c.wait_until(heard_worker, 15, "a worker-heartbeat event", interval=0.5)
                result = self.t("probe").delay("events")
                c.get(result, 20, "probe")
                wanted = {"task-sent", "task-received", "task-started", "task-succeeded"}
                c.wait_until(
                    lambda: wanted <= seen.get(result.id, set()) or failure,
                    15,
                    f"events {sorted(wanted - seen.get(result.id, set()))}",
                )
                c.check(not failure, f"event receiver failed: {failure and failure[0]!r}")
            finally:
                receiver.should_stop = True
                thread.join(10)

    @scenario("large_payload")
    def large_payload(self) -> str:
        c = self.c
        text = base64.b64encode(os.urandom(750_000)).decode()  # 1,000,000 characters
        c.equal(len(text), 1_000_000, "payload size")
        echoed = c.get(self.t("identity").delay(text), 60, "identity(1 MB text)")
        c.check(echoed == text, "1 MB text argument came back different")
        blob = os.urandom(1_000_000)
        echoed = c.get(self.t("identity").delay(blob), 60, "identity(1 MB bytes)")
        c.check(echoed == blob, "1 MB bytes argument came back different")
        return "1 MB text and 1 MB bytes, both ways"

    @scenario("unicode_binary")
    def unicode_binary(self) -> None:
        c = self.c
        identity = self.t("identity")
        text = "héllo wörld ✓ 日本語 עברית 🚀 e\u0301 end"
        c.equal(c.get(identity.delay(text), what="unicode text"), text, "unicode text")
        kwargs = {"ключ": "значение", "emoji 🚀": ["✓", "ü"]}
        echoed = c.get(self.t("identity_kwargs").delay(**kwargs), what="unicode kwargs")
        c.equal(echoed, kwargs, "unicode kwargs")
        blob = bytes(range(256)) * 4
        # JSON carries bytes as base64 (Kombu's JSON encoder).
        c.equal(c.get(identity.delay(blob), what="bytes via json"), blob, "bytes via json")
        # Pickle keeps the types JSON loses; result_extended stores the
        # arguments with the JSON result serializer, so no set or class here.
        when = datetime(2024, 2, 29, 12, 30, tzinfo=timezone.utc)
        payload = {"bytes": blob, "tuple": (1, "ü"), "datetime": when}
        described = c.get(
            self.t("describe").apply_async((payload,), serializer="pickle"), what="pickled args"
        )
        c.equal(
            {key: value[0] for key, value in described.items()},
            {"bytes": "bytes", "tuple": "tuple", "datetime": "datetime"},
            "types after pickle",
        )
        c.equal(described["tuple"][1], repr((1, "ü")), "pickled tuple")
        c.equal(described["datetime"][1], repr(when), "pickled datetime")
        c.equal(base64.b64decode(described["bytes"][1]), blob, "pickled bytes")
        # Last, so that a failure here says the cases above passed. JSON
        # allows U+0000 in strings, and Celery copies the arguments' repr
        # into the message headers.
        nul = "nul:\x00 end"
        c.step("sending a text argument with U+0000")
        c.equal(c.get(identity.delay(nul), what="text with U+0000"), nul, "text with U+0000")
        c.step("sending a task that fails with U+0000 in its message")
        error = c.get_error(self.t("fail").delay(nul), 15, "failure with U+0000 in its message")
        c.equal(str(error), nul, "error message with U+0000")

    @scenario("many_queues")
    def many_queues(self) -> None:
        c = self.c
        sent = []
        for i in range(ROUTED_QUEUES):
            name = f"compat.route{i}"
            route = c.app.amqp.router.route({}, name, (), {})
            c.equal(route["queue"].name, c.names.routed[i], f"task_routes for {name}")
            sent.append((c.names.routed[i], self.t(f"route{i}").delay(i)))
        explicit = c.names.routed[7]
        sent.append((explicit, self.t("probe").apply_async(("explicit",), queue=explicit)))
        for queue, result in sent:
            run = c.get(result, 30, f"task routed to {queue}")
            c.equal(run["routing_key"], queue, "delivery_info routing_key")

    @scenario("result_extended")
    def result_extended(self) -> None:
        c = self.c
        result = self.t("add").apply_async((2,), {"y": 3})
        c.equal(c.get(result, what="add(2, y=3)"), 5, "add(2, y=3)")
        c.equal(result.name, "compat.add", "result.name")
        c.equal(list(result.args or []), [2], "result.args")
        c.equal(result.kwargs, {"y": 3}, "result.kwargs")
        c.equal(result.worker, c.nodename, "result.worker")
        c.equal(result.queue, c.names.default, "result.queue")
        c.equal(result.retries, 0, "result.retries")
        c.check(result.date_done is not None, "result.date_done is empty")

    @scenario("failure_traceback")
    def failure_traceback(self) -> None:
        c = self.c
        result = self.t("fail").delay("boom ✗")
        error = c.get_error(result, 15, "fail")
        c.check(isinstance(error, ValueError), f"error {error!r} is not a ValueError")
        c.equal(str(error), "boom ✗", "error message")
        c.equal(result.state, "FAILURE", "state")
        traceback = result.traceback or ""
        c.check("ValueError: boom ✗" in traceback, f"traceback lacks the error: {traceback!r}")
        c.check(", in fail" in traceback, "traceback lacks the task's frame")
        try:
            result.get(timeout=5)
        except ValueError:
            pass
        else:
            raise ScenarioFailure("get() did not raise the task's ValueError")
