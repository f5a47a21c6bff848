-- Every query pgbroker runs, by name. `{schema}` is replaced by the quoted
-- schema identifier; values are always bound parameters.

-- name: process_lock
-- Every transport session holds its process's key as a shared advisory
-- lock (schema oid, process_key): while any of them lives, a consumer of
-- that process whose own lock is gone lost its session, its process did not
-- die (012_sessions_lost.sql).
-- Also returns the schema's oid, the consumers' lock class.
SELECT n.oid::bigint,
       pg_advisory_lock_shared(
           (n.oid::bigint - CASE WHEN n.oid::bigint >= 2147483648 THEN 4294967296 ELSE 0 END)::integer,
           %(process_key)s)
FROM pg_namespace n
WHERE n.nspname = %(schema_name)s;

-- name: register_consumer
-- A consumer is a session holding the advisory lock (schema oid, consumer
-- id). The lock is taken in the same statement that creates the row, so no
-- sweep can ever see the row without the lock. The row also names its
-- process's key (see process_lock). Also returns the server's timeline
-- (018_server_timeline: a lost session's acks are written only on it).
WITH c AS (
    INSERT INTO {schema}.consumer (hostname, pid)
    VALUES (%(hostname)s, %(pid)s)
    RETURNING id
), p AS (
    INSERT INTO {schema}.consumer_process (consumer_id, process_key)
    SELECT id, %(process_key)s FROM c
)
SELECT id, pg_advisory_lock(%(lock_class)s, id), {schema}.server_timeline() FROM c;

-- name: unregister_consumer
-- A clean shutdown: hand back what this consumer still holds, forget it,
-- release its lock.
WITH requeued AS (
    UPDATE {schema}.message
    SET state = 'ready', consumer_id = NULL
    WHERE state = 'reserved' AND consumer_id = %(consumer_id)s
    RETURNING queue
), gone AS (
    DELETE FROM {schema}.consumer WHERE id = %(consumer_id)s
)
SELECT (SELECT count(pg_notify(%(channel)s, q.queue))
        FROM (SELECT DISTINCT queue FROM requeued) q) AS notified,
       pg_advisory_unlock(%(lock_class)s, %(consumer_id)s) AS unlocked;

-- name: declare_exchange
-- Create the exchange if it is new; either way return its type, so that a
-- redeclaration with another type is caught, in one round trip.
WITH created AS (
    INSERT INTO {schema}.exchange (name, type, durable, auto_delete, arguments)
    VALUES (%(name)s, %(type)s, %(durable)s, %(auto_delete)s, %(arguments)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING type
)
SELECT type FROM created
UNION ALL
SELECT type FROM {schema}.exchange WHERE name = %(name)s;

-- name: exchange_type
SELECT type FROM {schema}.exchange WHERE name = %(name)s;

-- name: delete_exchange
DELETE FROM {schema}.exchange WHERE name = %(name)s;

-- name: declare_queue
-- Declaring a queue also marks it used (x-expires counts from last use).
-- An exclusive queue belongs to the declaring session's consumer
-- (`exclusive_to`), the last one to declare it (see drop_unused_queues).
-- An auto-delete queue that has had consumers and has no live one now is
-- one AMQP would have deleted already, and this declaration creates it
-- anew: never consumed. Otherwise a sweep could drop it between this
-- declaration and the binding or consumer that follows it (a worker's new
-- session redeclaring its lost session's pidbox queue: the bind failed on
-- the foreign key, and the worker stopped). A consumer whose session is
-- gone but that no sweep has removed yet still has its consumer_queue row:
-- only live ones count (their advisory lock is held, consumer_alive). The
-- row lock orders the two: a sweep's DELETE that waited for this statement
-- checks the row again and leaves it.
INSERT INTO {schema}.queue AS q (
    name, durable, auto_delete, message_ttl, expires, arguments, exclusive_to)
VALUES (%(name)s, %(durable)s, %(auto_delete)s,
        make_interval(secs => %(message_ttl)s), make_interval(secs => %(expires)s),
        %(arguments)s, %(exclusive_to)s)
ON CONFLICT (name) DO UPDATE SET
    last_used_at = now(), exclusive_to = coalesce(EXCLUDED.exclusive_to, q.exclusive_to),
    consumed = q.consumed AND EXISTS (
        SELECT 1 FROM {schema}.consumer_queue cq
        -- (The schema oid joined, not a sub-select argument: see consumer_alive.)
        CROSS JOIN (SELECT t.typnamespace AS oid FROM pg_type t
                    WHERE t.oid = pg_typeof(NULL::{schema}.consumer)::oid) ns
        CROSS JOIN LATERAL {schema}.consumer_alive(ns.oid, cq.consumer_id) a
        WHERE cq.queue = q.name AND a.alive)
RETURNING (SELECT count(*) FROM {schema}.message m
           WHERE m.queue = %(name)s AND m.state = 'ready');

-- name: queue_exists
SELECT EXISTS (SELECT 1 FROM {schema}.queue WHERE name = %(name)s);

-- name: delete_queue
-- Bindings go with the queue (foreign key); so do its messages, ready and
-- not ready, each found through its partial index.
WITH gone AS (
    DELETE FROM {schema}.queue WHERE name = %(name)s RETURNING name
), ready AS (
    DELETE FROM {schema}.message
    WHERE queue = %(name)s AND state = 'ready' AND EXISTS (SELECT 1 FROM gone)
)
DELETE FROM {schema}.message
WHERE queue = %(name)s AND state <> 'ready' AND EXISTS (SELECT 1 FROM gone);

-- name: bind
INSERT INTO {schema}.binding (exchange, routing_key, queue, pattern)
VALUES (%(exchange)s, %(routing_key)s, %(queue)s, %(pattern)s)
ON CONFLICT DO NOTHING;

-- name: unbind
DELETE FROM {schema}.binding
WHERE exchange = %(exchange)s AND routing_key = %(routing_key)s AND queue = %(queue)s;

-- name: list_bindings
SELECT queue, exchange, routing_key FROM {schema}.binding ORDER BY exchange, routing_key, queue;

-- name: publish
-- Store one message in the queues its cached route names (`queues`, with
-- each queue's message_ttl in seconds in `ttls`), resolved by
-- publish_routing at routing version `version` (pgbroker.broker.routing):
-- a plain insert and its NOTIFY, no routing table read. Only when that
-- version is still the current one (routing_version, one row, read in this
-- statement's snapshot: 015_routing_version.sql), so the route is exactly
-- what the tables say; otherwise (`stale`) nothing is stored, no
-- published_task row either, and the caller runs publish_routing. The
-- routing tables are not even in this statement: naming them costs the
-- server a quarter of the statement's time to lock and set up, even when
-- that part never runs. A route that goes nowhere is not sent here
-- (publish_routing dead-letters it); deduplication and eta are as in
-- publish_routing, below.
WITH current_routing AS (
    SELECT version = %(version)s::bigint AS ok FROM {schema}.routing_version
), first_publish AS (
    INSERT INTO {schema}.published_task AS p (
        task_id, retries, source, exchange, routing_key)
    SELECT %(task_id)s, %(retries)s, %(source)s, %(exchange)s, %(routing_key)s
    WHERE %(dedup)s AND (SELECT ok FROM current_routing)
    ON CONFLICT (task_id, retries, source) DO UPDATE SET
        exchange = EXCLUDED.exchange, routing_key = EXCLUDED.routing_key,
        published_at = now()
    WHERE (p.exchange, p.routing_key) IS DISTINCT FROM (EXCLUDED.exchange, EXCLUDED.routing_key)
    RETURNING 1
), fresh AS (
    SELECT NOT %(dedup)s OR EXISTS (SELECT 1 FROM first_publish) AS ok
), stored AS (
    INSERT INTO {schema}.message (
        queue, state, visible_at, priority, expires_at, exchange, routing_key, task_id,
        task_name, content_type, content_encoding, headers, properties, body)
    SELECT c.queue,
           CASE WHEN %(eta)s::timestamptz > now() THEN 'delayed' ELSE 'ready' END,
           CASE WHEN %(eta)s::timestamptz > now() THEN %(eta)s::timestamptz END,
           %(priority)s,
           least(now() + least(make_interval(secs => %(ttl)s), make_interval(secs => c.ttl)),
                 %(expires)s::timestamptz),
           %(exchange)s, %(routing_key)s, %(task_id)s, %(task_name)s,
           %(content_type)s, %(content_encoding)s, %(headers)s, %(properties)s, %(body)s
    FROM unnest(%(queues)s::text[], %(ttls)s::float8[]) AS c(queue, ttl)
    WHERE (SELECT ok FROM current_routing) AND (SELECT ok FROM fresh)
    RETURNING queue, state, visible_at, priority, id
)
SELECT (SELECT count(*) FROM stored) AS routed,
       0 AS dead_lettered,
       -- Per queue, the first new message's place in service order (a
       -- consumer claims from there, pgbroker/broker/cursor.py) and, with
       -- `wake_one`, one waiting consumer (waiting_consumer, 020): only
       -- that one claims at once. Without one, every consumer does.
       (SELECT count(pg_notify(%(channel)s,
            s.queue || E'\n' || s.priority || ' ' || s.id || coalesce(' ' || (
                SELECT consumer_id FROM {schema}.waiting_consumer
                WHERE %(wake_one)s AND queue = s.queue), '')))
        FROM (SELECT DISTINCT ON (queue) queue, priority, id FROM stored
              WHERE state = 'ready' ORDER BY queue, priority DESC, id) s
       ) AS notified,
       (SELECT count(pg_notify(%(due_channel)s,
                               extract(epoch FROM d.due)::text || ' ' || d.queue))
        FROM (SELECT queue, min(visible_at) AS due FROM stored
              WHERE state = 'delayed' GROUP BY queue) d) AS notified_delayed,
       (SELECT ok FROM current_routing) AND NOT (SELECT ok FROM fresh) AS duplicate,
       NOT (SELECT ok FROM current_routing) AS stale;

-- name: publish_routing
-- Route one message and store a copy in every matching queue, in one
-- statement. The anonymous exchange ('') routes to the queue named by the
-- routing key; other exchanges route through the bindings table. A
-- persistent message that matches nothing goes to dead_letter; a transient
-- one, or one sent to a non-durable exchange, is dropped, as AMQP does.
--
-- Run when the caller has no route cached for this exchange and routing
-- key, when its route is stale (`publish` said so), and for a cached route
-- that goes nowhere. `queues` and `ttls` are then the targets the caller
-- resolved at routing version `version`: when that version is still the
-- current one (routing_version, read in this statement's snapshot), they
-- are used as they are. Otherwise (`version` NULL; or a declaration,
-- binding or deletion committed since) the statement resolves the route
-- itself, as it always did, and returns the current version, the targets
-- it found and whether the exchange has no binding at all (every key then
-- routes nowhere), which the caller caches. Either way the route is the
-- one of this statement's snapshot.
--
-- A Celery task message with a `source` (`dedup` is set for those when
-- deduplication is on) is stored only the first time that source publishes
-- its (task id, retries) with this routing: first_publish inserts into
-- published_task, and a conflict (the same key, the same routing) inserts
-- nothing, so nothing else is stored. The source is 'run <id>' for a
-- publication made by the task run of message <id> (a redelivered run of a
-- message whose worker died after publishing a chain's next link, a retry
-- or a replacement publishes it again), 'copy <delivery tag>' for a copy of
-- a delivered message (celery migrate run again). Concurrent duplicates
-- wait on each other's key. Any other publication goes through: from
-- another message's run (Task.replace of a replacement), from outside a
-- task run (clients, a task id reused, a resend), or with another routing.
--
-- A message with a future `eta` (Celery's countdown/eta) is stored 'delayed'
-- until then: the NOTIFY on `due_channel` tells consumers when ("<epoch>
-- <queue>"), so they wake up at that time (see `promote`). `expires` (Celery's
-- task expiry) caps expires_at like a TTL: claims skip the message after it.
WITH first_publish AS (
    INSERT INTO {schema}.published_task AS p (
        task_id, retries, source, exchange, routing_key)
    SELECT %(task_id)s, %(retries)s, %(source)s, %(exchange)s, %(routing_key)s
    WHERE %(dedup)s
    ON CONFLICT (task_id, retries, source) DO UPDATE SET
        exchange = EXCLUDED.exchange, routing_key = EXCLUDED.routing_key,
        published_at = now()
    WHERE (p.exchange, p.routing_key) IS DISTINCT FROM (EXCLUDED.exchange, EXCLUDED.routing_key)
    RETURNING 1
), fresh AS (
    SELECT NOT %(dedup)s OR EXISTS (SELECT 1 FROM first_publish) AS ok
), current_routing AS (
    SELECT version FROM {schema}.routing_version
), cached AS (
    SELECT %(version)s::bigint IS NOT DISTINCT FROM (SELECT version FROM current_routing) AS ok
), target AS (
    SELECT c.queue, make_interval(secs => c.ttl) AS message_ttl
    FROM unnest(%(queues)s::text[], %(ttls)s::float8[]) AS c(queue, ttl)
    WHERE (SELECT ok FROM cached)
    UNION ALL
    SELECT r.queue, r.message_ttl
    FROM (
        SELECT q.name AS queue, q.message_ttl
        FROM {schema}.queue q
        WHERE %(exchange)s = '' AND q.name = %(routing_key)s
        UNION
        SELECT q.name, q.message_ttl
        FROM {schema}.binding b
        JOIN {schema}.exchange e ON e.name = b.exchange
        JOIN {schema}.queue q ON q.name = b.queue
        WHERE %(exchange)s <> '' AND b.exchange = %(exchange)s
          AND (e.type = 'fanout'
               OR (e.type = 'direct' AND b.routing_key = %(routing_key)s)
               OR (e.type = 'topic' AND ('.' || %(routing_key)s) ~ b.pattern))
    ) r
    WHERE NOT (SELECT ok FROM cached)
), stored AS (
    INSERT INTO {schema}.message (
        queue, state, visible_at, priority, expires_at, exchange, routing_key, task_id,
        task_name, content_type, content_encoding, headers, properties, body)
    SELECT t.queue,
           CASE WHEN %(eta)s::timestamptz > now() THEN 'delayed' ELSE 'ready' END,
           CASE WHEN %(eta)s::timestamptz > now() THEN %(eta)s::timestamptz END,
           %(priority)s,
           least(now() + least(make_interval(secs => %(ttl)s), t.message_ttl),
                 %(expires)s::timestamptz),
           %(exchange)s, %(routing_key)s, %(task_id)s, %(task_name)s,
           %(content_type)s, %(content_encoding)s, %(headers)s, %(properties)s, %(body)s
    FROM target t
    WHERE (SELECT ok FROM fresh)
    RETURNING queue, state, visible_at, priority, id
), unroutable AS (
    -- (014_shared_predicates.sql; counted below, which makes it run.)
    SELECT {schema}.add_dead_letter(
               reason => 'unroutable', queue => NULL, delivery_count => 0,
               published_at => now(), exchange => %(exchange)s::text,
               routing_key => %(routing_key)s::text, task_id => %(task_id)s::text,
               task_name => %(task_name)s::text, priority => %(priority)s::smallint,
               content_type => %(content_type)s::text,
               content_encoding => %(content_encoding)s::text, headers => %(headers)s::json,
               properties => %(properties)s::json, body => %(body)s::bytea) AS id
    WHERE %(persistent)s AND NOT EXISTS (SELECT 1 FROM target) AND (SELECT ok FROM fresh)
      -- A non-durable exchange holds nothing worth keeping: Kombu's pidbox
      -- broadcasts and replies (sent persistent by Celery's producer) to
      -- workers that are not there are dropped, as AMQP drops them.
      AND NOT EXISTS (SELECT 1 FROM {schema}.exchange e
                      WHERE e.name = %(exchange)s AND NOT e.durable)
)
SELECT (SELECT count(*) FROM stored) AS routed,
       (SELECT count(*) FROM unroutable) AS dead_lettered,
       -- Per queue, the first new message's place in service order (a
       -- consumer claims from there, pgbroker/broker/cursor.py) and, with
       -- `wake_one`, one waiting consumer (waiting_consumer, 020): only
       -- that one claims at once. Without one, every consumer does.
       (SELECT count(pg_notify(%(channel)s,
            s.queue || E'\n' || s.priority || ' ' || s.id || coalesce(' ' || (
                SELECT consumer_id FROM {schema}.waiting_consumer
                WHERE %(wake_one)s AND queue = s.queue), '')))
        FROM (SELECT DISTINCT ON (queue) queue, priority, id FROM stored
              WHERE state = 'ready' ORDER BY queue, priority DESC, id) s
       ) AS notified,
       (SELECT count(pg_notify(%(due_channel)s,
                               extract(epoch FROM d.due)::text || ' ' || d.queue))
        FROM (SELECT queue, min(visible_at) AS due FROM stored
              WHERE state = 'delayed' GROUP BY queue) d) AS notified_delayed,
       NOT (SELECT ok FROM fresh) AS duplicate,
       -- Resolved here (the cache was stale): the route to cache, at this
       -- version. NULL when the cached targets were used.
       (SELECT version FROM current_routing) AS version,
       CASE WHEN NOT (SELECT ok FROM cached) THEN
           (SELECT coalesce(array_agg(t.queue ORDER BY t.queue), '{{}}') FROM target t)
       END AS queues,
       CASE WHEN NOT (SELECT ok FROM cached) THEN
           (SELECT coalesce(array_agg(extract(epoch FROM t.message_ttl)::float8
                                      ORDER BY t.queue), '{{}}')
            FROM target t)
       END AS ttls,
       -- No binding at all on this exchange: no routing key goes anywhere.
       CASE WHEN NOT (SELECT ok FROM cached) THEN
           %(exchange)s <> '' AND NOT EXISTS (
               SELECT 1 FROM {schema}.binding b WHERE b.exchange = %(exchange)s)
       END AS unbound;

-- name: claim
-- Reserve up to `limit` ready messages of one queue for this consumer, in
-- service order (priority 9 first, then oldest first), from a position in
-- that order (`from_priority`, `from_id`) before which the consumer knows
-- no ready message (pgbroker/broker/cursor.py; priority 10 and id 0 is the
-- whole queue). Two scans of the message_ready index: the rest of the
-- position's priority from its id, then the lower priorities. Starting
-- there, a claim does not visit the entries of the messages claimed before
-- it: when a long transaction keeps VACUUM from removing them, each one
-- costs a visit to the table. SKIP LOCKED lets many consumers claim from
-- one queue without waiting on each other. The ids go through an array
-- rather than a join, so that even a generic plan (which cannot know
-- `limit`) fetches them by primary key instead of hashing the whole table.
--
-- One statement, the whole of its transaction (the Sync after it commits,
-- pgbroker/broker/transport.py `_run_pipelined`); its rows reach the
-- consumer before the commit's reply, so the commit must not be able to
-- fail while the session lives. READ COMMITTED is the session's (pinned,
-- pgbroker/database/sessions.py). claim_settings (019), run at the first
-- ready row a scan meets, checks every deferred constraint at the end of
-- this statement instead of at the commit, and lets the commit skip the
-- WAL flush unless the acks removed messages (docs/delivery.md, "What a
-- server crash may undo"). A claim that meets no ready row never runs it:
-- it writes nothing but its acks, which then commit as configured.
--
-- The consumer's acks made since its last statement (`acks`, fenced as in
-- `ack`) ride along: they commit with the claim, one commit instead of two.
--
-- The claim also says whether its consumer now waits for a wake-up
-- (consumer_queue.waiting_since, 020_waiting_consumers.sql): it got fewer
-- than `limit` (nothing more is ready for it) and keeps at least `wake_min`
-- free (it would claim again at once when woken). A publish names one
-- waiting consumer in its NOTIFY. Written only when it changes, with no
-- flush either; `wake_min` NULL leaves it as it is (the consumer changed
-- it less than WAITING_WRITE_EVERY ago, pgbroker/broker/consumer.py).
WITH acked AS (
    DELETE FROM {schema}.message
    WHERE id = ANY (%(acks)s::bigint[]) AND consumer_id = %(consumer_id)s
    RETURNING 1
), same_priority AS MATERIALIZED (
    SELECT id
    FROM {schema}.message
    WHERE queue = %(queue)s AND state = 'ready'
      -- The one priority as a range, and ordered by it: only message_ready
      -- gives this order. Written `priority = ...`, the order is by id alone,
      -- and where one queue holds everything at one priority the planner
      -- walked the primary key from the id instead, through every row
      -- version after it, of every queue (tests/test_claim_plan.py).
      AND priority >= %(from_priority)s AND priority <= %(from_priority)s
      AND id >= %(from_id)s
      AND (expires_at IS NULL OR expires_at > now())
      -- A scalar subquery: run once, when first needed.
      AND (SELECT {schema}.claim_settings(EXISTS (SELECT FROM acked)))
    ORDER BY priority DESC, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), lower_priorities AS MATERIALIZED (
    SELECT id
    FROM {schema}.message
    WHERE queue = %(queue)s AND state = 'ready'
      AND priority < %(from_priority)s
      AND (expires_at IS NULL OR expires_at > now())
      AND (SELECT {schema}.claim_settings(EXISTS (SELECT FROM acked)))
    ORDER BY priority DESC, id
    -- Not scanned at all when the first scan filled the claim.
    LIMIT %(limit)s - (SELECT count(*) FROM same_priority)
    FOR UPDATE SKIP LOCKED
), claimed AS (
    SELECT (SELECT count(*) FROM same_priority) + (SELECT count(*) FROM lower_priorities) AS n
), waits AS (
    SELECT n < %(limit)s AND %(limit)s - n >= %(wake_min)s AS now_waiting FROM claimed
    WHERE %(wake_min)s IS NOT NULL
), waiting AS (
    UPDATE {schema}.consumer_queue c
    SET waiting_since = CASE WHEN w.now_waiting THEN now() END
    FROM waits w
    WHERE c.consumer_id = %(consumer_id)s AND c.queue = %(queue)s
      AND w.now_waiting = (c.waiting_since IS NULL)
      AND (SELECT {schema}.claim_settings(EXISTS (SELECT FROM acked)))
)
UPDATE {schema}.message m
SET state = 'reserved', consumer_id = %(consumer_id)s, claimed_at = now(),
    delivery_count = m.delivery_count + 1
WHERE m.id = ANY (ARRAY (SELECT id FROM same_priority UNION ALL
                         SELECT id FROM lower_priorities))
RETURNING m.id, m.priority, m.delivery_count, m.exchange, m.routing_key,
          m.content_type, m.content_encoding, m.headers, m.properties, m.body,
          -- Was delayed until its eta: the consumer drops the eta header (due).
          m.visible_at IS NOT NULL,
          -- With the id, names this message for good (see ack_orphaned).
          m.published_at,
          -- The task's received_at, when pgbroker stores its result.
          m.claimed_at;

-- name: wake_consumers
-- A wake-up its consumer cannot act on, passed to every consumer of the
-- queue (`payload` is `queue\n<priority> <id>`, pgbroker/broker/cursor.py):
-- a publish named this consumer while its window was full, or named it for
-- a message its full claim did not reach. A NOTIFY writes nothing worth a
-- flush.
SELECT pg_catalog.set_config('synchronous_commit', 'off', true),
       pg_notify(%(channel)s, %(payload)s);

-- name: ack_orphaned
-- Acks made for a session that is gone (lost before they were written, see
-- "When a claim or an ack fails" in docs/delivery.md). An ack still applies
-- while nobody has had its message since the delivery that was acked: the
-- message is still reserved by that session's consumer, or it is ready
-- again (recovered by the sweep, or its claim never committed) and its
-- delivery count has not grown since. A message claimed by another consumer
-- meanwhile is left alone (that consumer holds it now).
--
-- The id alone does not name the message: a server that lost its last
-- commits (an asynchronous standby promoted, a crash with commits not yet
-- flushed) hands the lost window's ids out again, to other messages, and
-- consumer ids too. The message's published_at, which never changes, tells
-- them apart: a message that took the id later was published later.
DELETE FROM {schema}.message m
USING unnest(%(ids)s::bigint[], %(consumer_ids)s::int[], %(counts)s::int[],
             %(published)s::timestamptz[])
      AS a(id, consumer_id, delivery_count, published_at)
WHERE m.id = a.id
  AND m.published_at = a.published_at
  AND m.delivery_count <= a.delivery_count
  AND (m.state = 'ready' OR (m.state = 'reserved' AND m.consumer_id = a.consumer_id));

-- name: claim_no_ack
-- The same for consumers that do not acknowledge (pidbox, events): the
-- message is removed as it is handed over.
DELETE FROM {schema}.message m
WHERE m.id = ANY (ARRAY (
    SELECT id
    FROM {schema}.message
    WHERE queue = %(queue)s AND state = 'ready'
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY priority DESC, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))
RETURNING m.id, m.priority, m.delivery_count + 1, m.exchange, m.routing_key,
          m.content_type, m.content_encoding, m.headers, m.properties, m.body,
          m.visible_at IS NOT NULL, m.published_at, now();

-- name: ack
-- Fenced: only the consumer that holds a message can acknowledge it.
DELETE FROM {schema}.message
WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer_id)s;

-- name: finish_ack
-- A task run's own message, acknowledged in the transaction that stores its
-- result and sends its chain's next link (pgbroker/broker/finish.py):
-- 'acked' when this delivery still held it: its consumer holds it, or the
-- consumer's session was lost and nobody has had the message since (ready
-- again, its delivery count not grown, as in ack_orphaned: the worker's own
-- ack of this run would be written so, and a finish rolled back would leave
-- the message to that ack with no result stored). 'elsewhere' when another
-- delivery has had it since: the caller then rolls the whole finish back,
-- which restores the row, and that delivery finishes it. 'gone': it was
-- removed already (acknowledged as it was delivered, without acks_late).
-- The row is deleted whoever holds it, and judged as deleted: the version
-- this statement's snapshot sees may be older than the one it deletes (the
-- claim that handed the message over may still be committing, as a claim
-- hands its rows over before its commit: the DELETE waits for it and takes
-- the committed version), and the lock taken keeps the answer true until
-- the commit. A row with this id published at another time is another
-- message (ids come again after a lost window, see ack_orphaned): 'gone'.
-- 'other timeline' when the message is there but was claimed on another
-- server timeline (an asynchronous standby promoted since, 018): the old
-- primary's lost commits may hold the run's work, so the caller rolls back
-- and the message is delivered again, as ack_orphaned's acks are not written.
WITH acked AS (
    DELETE FROM {schema}.message
    WHERE id = %(message_id)s AND published_at = %(published_at)s::timestamptz
    RETURNING CASE WHEN state = 'reserved' AND consumer_id = %(consumer_id)s THEN 'acked'
                   WHEN state = 'ready' AND delivery_count <= %(delivery_count)s THEN 'acked'
                   ELSE 'elsewhere' END AS outcome
)
SELECT CASE WHEN NOT EXISTS (SELECT FROM acked) THEN 'gone'
            WHEN %(timeline)s::integer IS DISTINCT FROM {schema}.server_timeline()
            THEN 'other timeline'
            ELSE (SELECT outcome FROM acked) END;

-- name: message_exists
SELECT EXISTS (SELECT 1 FROM {schema}.message WHERE id = %(message_id)s);

-- name: requeue
-- Fenced like ack. The message keeps its id, so it goes back to its place;
-- each one is logged in redelivery with `reason`. With `counted` (a reject
-- with requeue), this delivery counts towards max_deliveries: a message
-- delivered that many times goes to dead_letter instead, and a Celery task
-- gets a FAILURE result (unless its result is already final, see
-- task_failed below). Without it (messages handed back as a channel
-- closes or recovers: held, perhaps never processed), none is dead-lettered;
-- the delivery still counts (the message is redelivered), so it may be
-- dead-lettered at its next counted recovery. (Deliveries that ended with
-- a lost session, 'session lost' in redelivery, never count: see sweep.)
WITH exhausted AS (
    DELETE FROM {schema}.message m
    WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer_id)s
      AND %(counted)s AND %(max_deliveries)s > 0 AND delivery_count >= %(max_deliveries)s
      AND delivery_count - (SELECT count(*) FROM {schema}.redelivery r
                            WHERE r.message_id = m.id AND r.reason = 'session lost')
          >= %(max_deliveries)s
    RETURNING *
), back AS (
    UPDATE {schema}.message
    SET state = 'ready', consumer_id = NULL
    WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer_id)s
      AND id NOT IN (SELECT id FROM exhausted)
    RETURNING id, queue, task_id, delivery_count
), logged AS (
    INSERT INTO {schema}.redelivery (
        reason, message_id, queue, task_id, consumer_id, delivery_count)
    SELECT %(reason)s, id, queue, task_id, %(consumer_id)s, delivery_count FROM back
    UNION ALL
    SELECT 'max deliveries (requeued)', id, queue, task_id, %(consumer_id)s, delivery_count
    FROM exhausted
), lettered AS (
    -- (014_shared_predicates.sql; counted below, which makes it run.)
    SELECT {schema}.add_dead_letter('max deliveries (requeued)', e) AS id FROM exhausted e
), task_failed AS (
    -- (task_result, as the result backend writes it; see sweep.)
    INSERT INTO {schema}.task_result AS r (
        task_id, state, name, result, content_type, content_encoding, date_done)
    SELECT DISTINCT ON (task_id) task_id, 'FAILURE', task_name,
           convert_to(json_build_object(
               'exc_type', 'Reject', 'exc_module', 'celery.exceptions',
               'exc_message', json_build_array(format(
                   'pgbroker: requeued after %%s deliveries (max_deliveries=%%s); '
                   'the message is in the dead_letter table',
                   delivery_count, %(max_deliveries)s)))::text, 'UTF8'),
           'application/json', 'utf-8', now()
    FROM exhausted
    WHERE task_id IS NOT NULL AND task_name IS NOT NULL
    ORDER BY task_id
    ON CONFLICT (task_id) DO UPDATE SET
        state = EXCLUDED.state, result = EXCLUDED.result,
        content_type = EXCLUDED.content_type, content_encoding = EXCLUDED.content_encoding,
        traceback = NULL, date_done = EXCLUDED.date_done, updated_at = now()
    WHERE r.state NOT IN ('SUCCESS', 'FAILURE', 'REVOKED')
    RETURNING r.task_id, r.state
)
SELECT (SELECT count(pg_notify(%(channel)s, b.queue))
        FROM (SELECT DISTINCT queue FROM back) b) AS notified,
       (SELECT count(pg_notify('pgr_' || md5(%(schema_name)s || '/' || t.task_id),
                               json_build_array(t.task_id, t.state)::text))
        FROM task_failed t) AS results,
       (SELECT count(*) FROM lettered) AS dead_lettered;

-- name: unclaim
-- Like requeue, for messages claimed but never handed to the application
-- (its callback raised first): this delivery does not count.
WITH back AS (
    UPDATE {schema}.message
    SET state = 'ready', consumer_id = NULL, delivery_count = delivery_count - 1
    WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer_id)s
    RETURNING queue
)
SELECT count(pg_notify(%(channel)s, b.queue)) FROM (SELECT DISTINCT queue FROM back) b;

-- name: reject
-- A message rejected without requeue is kept in dead_letter, not dropped
-- (one row per dead letter: the caller counts them).
WITH gone AS (
    DELETE FROM {schema}.message
    WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer_id)s
    RETURNING *
)
SELECT {schema}.add_dead_letter('rejected', g) FROM gone g;

-- name: size
SELECT count(*) FROM {schema}.message WHERE queue = %(queue)s AND state = 'ready';

-- name: purge
DELETE FROM {schema}.message WHERE queue = %(queue)s AND state = 'ready';

-- name: attach_queue
-- Also returns when the queue's earliest delayed message is due, and the
-- server's clock, so the consumer can set its timer (see promote). The
-- queue has had a consumer from now on (`consumed`, see drop_unused_queues).
WITH touched AS (
    UPDATE {schema}.queue SET last_used_at = now(), consumed = true WHERE name = %(queue)s
), attached AS (
    INSERT INTO {schema}.consumer_queue (consumer_id, queue)
    VALUES (%(consumer_id)s, %(queue)s)
    ON CONFLICT DO NOTHING
)
SELECT extract(epoch FROM (
           SELECT visible_at FROM {schema}.message
           WHERE state = 'delayed' AND queue = %(queue)s
           ORDER BY visible_at LIMIT 1))::float8 AS next_due,
       extract(epoch FROM now())::float8 AS server_now;

-- name: detach_queue
-- Says whether the queue is auto-delete: then the consumer runs
-- drop_unused_queues for it next (a statement of its own, so that it sees
-- the detaches other sessions committed meanwhile).
WITH touched AS (
    UPDATE {schema}.queue SET last_used_at = now() WHERE name = %(queue)s
    RETURNING auto_delete
), detached AS (
    DELETE FROM {schema}.consumer_queue
    WHERE consumer_id = %(consumer_id)s AND queue = %(queue)s
)
SELECT coalesce((SELECT auto_delete FROM touched), false);

-- name: drop_unused_queues
-- Queues that go as AMQP deletes them, with their bindings (foreign key)
-- and their messages: auto-delete queues that have had a consumer and have
-- none now (the last one cancelled, closed its connection, or died and was
-- removed by the sweep), and exclusive queues whose declaring session's
-- consumer is gone. `queue`: only that one (after a cancel); NULL: all of
-- them (after a close, and after a sweep that removed dead consumers).
WITH gone AS (
    DELETE FROM {schema}.queue q
    WHERE (%(queue)s::text IS NULL OR q.name = %(queue)s::text)
      AND ((q.auto_delete AND q.consumed
            AND NOT EXISTS (SELECT 1 FROM {schema}.consumer_queue cq WHERE cq.queue = q.name))
           OR (q.exclusive_to IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM {schema}.consumer c WHERE c.id = q.exclusive_to)))
    RETURNING q.name
), ready AS (
    -- (Two statements so that each uses its partial index.)
    DELETE FROM {schema}.message m
    WHERE m.queue IN (SELECT name FROM gone) AND m.state = 'ready'
), unready AS (
    DELETE FROM {schema}.message m
    WHERE m.queue IN (SELECT name FROM gone) AND m.state <> 'ready'
)
SELECT count(*) FROM gone;

-- name: promote
-- Delayed messages of this consumer's queues that are due become ready, a
-- bounded batch at a time (run again while it comes back full), and their
-- queues are NOTIFYed, which wakes every consumer of them (this one too).
-- Several consumers may promote at once: SKIP LOCKED leaves each row to one.
-- Also returns when the next delayed message of these queues is due and the
-- server's clock, for the consumer's timer. Rows that are due but locked by
-- another promoter are not "next": that promoter's NOTIFY announces them.
WITH promoted AS (
    UPDATE {schema}.message m SET state = 'ready'
    WHERE m.id = ANY (ARRAY (
        SELECT id FROM {schema}.message
        WHERE state = 'delayed' AND queue = ANY(%(queues)s::text[]) AND visible_at <= now()
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING m.queue
)
SELECT (SELECT count(*) FROM promoted) AS promoted,
       (SELECT count(pg_notify(%(channel)s, p.queue))
        FROM (SELECT DISTINCT queue FROM promoted) p) AS notified,
       (SELECT extract(epoch FROM min(n.visible_at))::float8
        FROM unnest(%(queues)s::text[]) q(name)
        CROSS JOIN LATERAL (
            SELECT visible_at FROM {schema}.message
            WHERE state = 'delayed' AND queue = q.name AND visible_at > now()
            ORDER BY visible_at LIMIT 1) n) AS next_due,
       extract(epoch FROM now())::float8 AS server_now;

-- name: prune_published
-- published_task rows older than the dedup window, one batch (housekeep
-- prunes the same way among its other batches; this one alone is for
-- measuring and for operators).
-- (By ctid: a TID scan, where a join on the key would scan the table.)
DELETE FROM {schema}.published_task p
WHERE p.ctid = ANY (ARRAY (
    SELECT ctid FROM {schema}.published_task
    WHERE published_at < now() - make_interval(secs => %(window)s)
    ORDER BY published_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED));

-- name: sweep
-- The safety sweep, one statement every sweep_interval seconds (and at once
-- when the sweeper thread sees a consumer die). Recovery (1) is small and
-- urgent; housekeeping (2, 3, 5, 6, 7) is done in bounded batches, rows locked
-- by another sweep skipped (SKIP LOCKED), so that a large backlog of
-- expired rows never delays a recovery by more than one batch: the client
-- (pgbroker.broker.sweeper.sweep_more) runs the sweep again while a batch comes
-- back full (`full`), for a bounded time, and the rest goes at the next
-- sweeps. The sweeper thread's urgent sweep, right after a death, passes
-- limits of 0: recovery alone.
-- 1. consumers whose session is gone (their advisory lock is free) are
--    removed and the messages they held go back to their queues, logged in
--    redelivery. Only rows still owned by a dead consumer are touched, so a
--    message a live consumer has since claimed is never taken from it. If
--    the consumer's process still has a session (its key is locked, see
--    process_lock), only the session was lost: reason 'session lost', which
--    max_deliveries does not count (012_sessions_lost.sql). Otherwise
--    (reason 'consumer died') a message already delivered max_deliveries
--    times, not counting those, goes to dead_letter instead (also logged in
--    redelivery), and a Celery task gets a FAILURE result;
-- 2. expired ready messages (TTL, Celery's `expires`) are removed, a batch
--    at a time; those of Celery tasks go to dead_letter (reason 'expired')
--    and the task gets a REVOKED result, as Celery's worker stores for an
--    expired task;
-- 3. queues unused for longer than their x-expires lose their messages, a
--    batch at a time (as AMQP deletes a queue's unacked messages with it,
--    so none is left behind in a queue that no longer exists), and the
--    queue row goes in the sweep after its last batch; a queue whose
--    consumer just died gets a fresh last_used_at instead, so its expiry
--    counts from the death;
-- 4. due delayed messages of this consumer's queues are promoted (the
--    consumer's timer normally does it; this is the safety net), and the
--    next due time is returned for the timer;
-- 5. one batch of published_task rows older than the dedup window goes;
-- 6. one batch of results and saved groups past their expires_at
--    (result_expires when stored; reads already treat them as gone) goes;
-- 7. the first sweep of a minute samples the message id sequence for the
--    dashboard (publish_sample, 017_history.sql), and samples older than a
--    day go.
-- It also says whether live consumers of processes other than
-- (own_host, own_pid) exist: a lone sweeper thread (pgbroker/broker/sweeper.py)
-- then goes back to watching them. Results are written to task_result
-- only where the task's row is not final yet (SUCCESS, FAILURE, REVOKED),
-- and announced on the task's channel (pgbroker.results.consumer.channel_for)
-- so a waiting get() wakes.
WITH dead AS (
    -- Locked, and skipped when locked: two sweeps running at once (two
    -- workers, or a worker and its sweeper thread) never both handle one
    -- dead consumer. Otherwise the second sweep's UPDATE would wait for the
    -- first, find the row requeued, and still hold a lock on it until it
    -- ends: the claim woken by the first sweep's NOTIFY would skip the
    -- locked row (SKIP LOCKED), and no NOTIFY would come again.
    -- (consumer_alive: 014_shared_predicates.sql.)
    SELECT c.id,
           -- Its process lives on (another of its sessions holds its key).
           EXISTS (
               SELECT 1 FROM {schema}.consumer_process p
               CROSS JOIN LATERAL {schema}.consumer_alive(%(lock_oid)s::oid, p.process_key) pa
               WHERE p.consumer_id = c.id AND pa.alive) AS lost
    FROM {schema}.consumer c
    CROSS JOIN LATERAL {schema}.consumer_alive(%(lock_oid)s::oid, c.id) a
    WHERE NOT a.alive
    FOR UPDATE OF c SKIP LOCKED
), expired_queues AS (
    SELECT q.name FROM {schema}.queue q
    WHERE q.expires IS NOT NULL AND q.last_used_at + q.expires < now()
      AND NOT EXISTS (SELECT 1 FROM {schema}.consumer_queue cq WHERE cq.queue = q.name)
), removed_queues AS (
    -- Empty when this statement began: the sweep after its last batch.
    DELETE FROM {schema}.queue q
    USING expired_queues e
    WHERE q.name = e.name AND %(housekeep_limit)s > 0
      AND NOT EXISTS (SELECT 1 FROM {schema}.message m
                      WHERE m.queue = q.name AND m.state = 'ready')
      AND NOT EXISTS (SELECT 1 FROM {schema}.message m
                      WHERE m.queue = q.name AND m.state <> 'ready')
    RETURNING q.name
), exhausted AS (
    -- A process death: the deliveries that ended with a lost session
    -- (looked up only for a message that reached max_deliveries) do not count.
    DELETE FROM {schema}.message m
    USING dead
    WHERE m.state = 'reserved' AND m.consumer_id = dead.id AND NOT dead.lost
      AND m.queue NOT IN (SELECT name FROM expired_queues)
      AND %(max_deliveries)s > 0 AND m.delivery_count >= %(max_deliveries)s
      AND m.delivery_count - (SELECT count(*) FROM {schema}.redelivery r
                              WHERE r.message_id = m.id AND r.reason = 'session lost')
          >= %(max_deliveries)s
    RETURNING m.*  -- (a message row: see lettered)
), requeued AS (
    UPDATE {schema}.message m
    SET state = 'ready', consumer_id = NULL
    FROM dead
    WHERE m.state = 'reserved' AND m.consumer_id = dead.id
      AND m.queue NOT IN (SELECT name FROM expired_queues)
      AND m.id NOT IN (SELECT id FROM exhausted)
    RETURNING m.id, m.queue, m.task_id, m.delivery_count, dead.id AS consumer_id, dead.lost
), logged AS (
    INSERT INTO {schema}.redelivery (reason, message_id, queue, task_id, consumer_id, delivery_count)
    SELECT CASE WHEN lost THEN 'session lost' ELSE 'consumer died' END,
           id, queue, task_id, consumer_id, delivery_count
    FROM requeued
    UNION ALL
    SELECT 'max deliveries (consumer died)', id, queue, task_id, consumer_id, delivery_count
    FROM exhausted
), gone_consumers AS (
    DELETE FROM {schema}.consumer c USING dead WHERE c.id = dead.id
), orphaned_queues AS (
    UPDATE {schema}.queue q SET last_used_at = now()
    FROM {schema}.consumer_queue cq JOIN dead ON dead.id = cq.consumer_id
    WHERE q.name = cq.queue AND q.expires IS NOT NULL
), dropped_ready AS (
    -- (Two statements so that each uses its partial index; a batch per
    -- queue, by a lateral join, which the planner keeps on the index.)
    DELETE FROM {schema}.message m
    WHERE m.id = ANY (ARRAY (
        SELECT d.id FROM expired_queues e CROSS JOIN LATERAL (
            SELECT id FROM {schema}.message
            WHERE queue = e.name AND state = 'ready'
            ORDER BY priority DESC, id  -- (the index's order: no scan of the table)
            LIMIT %(housekeep_limit)s FOR UPDATE SKIP LOCKED) d
        LIMIT %(housekeep_limit)s))
    RETURNING m.id
), dropped_unready AS (
    DELETE FROM {schema}.message m
    WHERE m.id = ANY (ARRAY (
        SELECT d.id FROM expired_queues e CROSS JOIN LATERAL (
            SELECT id FROM {schema}.message
            WHERE queue = e.name AND state <> 'ready'
            LIMIT %(housekeep_limit)s FOR UPDATE SKIP LOCKED) d
        LIMIT %(housekeep_limit)s))
    RETURNING m.id
), expired_messages AS (
    -- (Expired queues' rows are left to dropped_*, outside the subquery:
    -- inside, the planner misjudges the filter and scans the table.)
    DELETE FROM {schema}.message m
    WHERE m.id = ANY (ARRAY (
        SELECT id FROM {schema}.message
        WHERE expires_at <= now() AND state = 'ready'
        ORDER BY expires_at
        LIMIT %(housekeep_limit)s
        FOR UPDATE SKIP LOCKED))
      AND m.queue <> ALL (ARRAY (SELECT name FROM expired_queues))
    RETURNING m.*
), lettered AS (
    -- (014_shared_predicates.sql; counted below, which makes it run.)
    SELECT 'max deliveries (consumer died)' AS reason,
           {schema}.add_dead_letter('max deliveries (consumer died)', e) AS id
    FROM exhausted e
    UNION ALL
    SELECT 'expired', {schema}.add_dead_letter('expired', x)
    FROM expired_messages x
    WHERE x.task_id IS NOT NULL AND x.task_name IS NOT NULL
), task_ended AS (
    -- The row Celery itself stores (json): REVOKED with
    -- TaskRevokedError('expired') for an expired task, FAILURE for one that
    -- was never acknowledged in max_deliveries deliveries.
    INSERT INTO {schema}.task_result AS r (
        task_id, state, name, result, content_type, content_encoding, date_done)
    SELECT DISTINCT ON (e.task_id) e.task_id, e.state, e.task_name,
           convert_to(json_build_object(
               'exc_type', e.exc_type, 'exc_module', 'celery.exceptions',
               'exc_message', json_build_array(e.message))::text, 'UTF8'),
           'application/json', 'utf-8', now()
    FROM (
        SELECT task_id, task_name, 'REVOKED' AS state, 'TaskRevokedError' AS exc_type,
               'expired' AS message
        FROM expired_messages
        UNION ALL
        SELECT task_id, task_name, 'FAILURE', 'WorkerLostError',
               format('pgbroker: delivered %%s times without an ack (max_deliveries=%%s), '
                      'the last time to a worker process that died holding it%%s; the '
                      'message is in the dead_letter table',
                      delivery_count - lost_deliveries, %(max_deliveries)s,
                      CASE WHEN lost_deliveries > 0
                           THEN format(' (%%s more deliveries ended with only the worker''s '
                                       'database session lost: not counted)', lost_deliveries)
                           ELSE '' END)
        FROM exhausted
        CROSS JOIN LATERAL (
            SELECT count(*) AS lost_deliveries FROM {schema}.redelivery r
            WHERE r.message_id = exhausted.id AND r.reason = 'session lost') l
    ) e
    WHERE e.task_id IS NOT NULL AND e.task_name IS NOT NULL
    ORDER BY e.task_id
    ON CONFLICT (task_id) DO UPDATE SET
        state = EXCLUDED.state, result = EXCLUDED.result,
        content_type = EXCLUDED.content_type, content_encoding = EXCLUDED.content_encoding,
        traceback = NULL, date_done = EXCLUDED.date_done, updated_at = now(),
        expires_at = NULL
    WHERE r.state NOT IN ('SUCCESS', 'FAILURE', 'REVOKED') OR r.expires_at <= now()
    RETURNING r.task_id, r.state
), promoted AS (
    UPDATE {schema}.message m SET state = 'ready'
    WHERE m.id = ANY (ARRAY (
        SELECT id FROM {schema}.message
        WHERE state = 'delayed' AND queue = ANY(%(queues)s::text[]) AND visible_at <= now()
        LIMIT %(promote_limit)s
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING m.queue
), pruned AS (
    DELETE FROM {schema}.published_task p
    WHERE p.ctid = ANY (ARRAY (
        SELECT ctid FROM {schema}.published_task
        WHERE published_at < now() - make_interval(secs => %(dedup_window)s)
        ORDER BY published_at
        LIMIT %(prune_limit)s
        FOR UPDATE SKIP LOCKED))
    RETURNING 1
), expired_results AS (
    -- (Not the rows task_ended writes: one statement must not both update
    -- and delete a row.)
    DELETE FROM {schema}.task_result r
    WHERE r.task_id = ANY (ARRAY (
        SELECT task_id FROM {schema}.task_result
        WHERE expires_at <= now()
        ORDER BY expires_at
        LIMIT %(housekeep_limit)s
        FOR UPDATE SKIP LOCKED))
      AND r.task_id <> ALL (ARRAY (
          SELECT task_id FROM expired_messages WHERE task_id IS NOT NULL
          UNION ALL
          SELECT task_id FROM exhausted WHERE task_id IS NOT NULL))
    RETURNING 1
), expired_groups AS (
    DELETE FROM {schema}.group_result g
    WHERE g.group_id = ANY (ARRAY (
        SELECT group_id FROM {schema}.group_result
        WHERE expires_at <= now()
        ORDER BY expires_at
        LIMIT %(housekeep_limit)s
        FOR UPDATE SKIP LOCKED))
    RETURNING 1
), sampled AS (
    -- The message id sequence at the first sweep of each minute, for the
    -- dashboard's publish rate (017_history.sql). A housekeeping sweep only.
    SELECT {schema}.sample_publishes() AS taken WHERE %(housekeep_limit)s > 0
)
SELECT (SELECT count(*) FROM requeued) AS requeued,
       (SELECT count(*) FROM expired_messages) AS expired_messages,
       (SELECT count(*) FROM removed_queues) AS expired_queues,
       (SELECT count(pg_notify(%(channel)s, r.queue))
        FROM (SELECT queue FROM requeued UNION SELECT queue FROM promoted) r) AS notified,
       (SELECT count(*) FROM lettered
        WHERE reason = 'max deliveries (consumer died)') AS dead_lettered,
       (SELECT count(*) FROM lettered WHERE reason = 'expired') AS expired_tasks,
       (SELECT count(pg_notify('pgr_' || md5(%(schema_name)s || '/' || t.task_id),
                               json_build_array(t.task_id, t.state)::text))
        FROM task_ended t) AS results,
       (SELECT count(*) FROM promoted) AS promoted,
       (SELECT count(*) FROM pruned) AS pruned,
       (SELECT extract(epoch FROM min(n.visible_at))::float8
        FROM unnest(%(queues)s::text[]) q(name)
        CROSS JOIN LATERAL (
            SELECT visible_at FROM {schema}.message
            WHERE state = 'delayed' AND queue = q.name AND visible_at > now()
            ORDER BY visible_at LIMIT 1) n) AS next_due,
       extract(epoch FROM now())::float8 AS server_now,
       EXISTS (SELECT 1 FROM {schema}.consumer c
               WHERE NOT (c.hostname = %(own_host)s AND c.pid = %(own_pid)s)
                 AND c.id NOT IN (SELECT id FROM dead)) AS others,
       (SELECT count(*) FROM expired_results) + (SELECT count(*) FROM expired_groups)
           AS expired_results,
       -- Some housekeeping batch came back full (or emptied an expired
       -- queue, whose row goes next time): run again.
       %(housekeep_limit)s > 0 AND (
           (SELECT count(*) FROM expired_messages) >= %(housekeep_limit)s
           OR (SELECT count(*) FROM pruned) >= %(prune_limit)s
           OR (SELECT count(*) FROM expired_results) >= %(housekeep_limit)s
           OR (SELECT count(*) FROM expired_groups) >= %(housekeep_limit)s
           OR EXISTS (SELECT 1 FROM dropped_ready)
           OR EXISTS (SELECT 1 FROM dropped_unready)) AS full,
       -- Dead consumers removed: their auto-delete and exclusive queues go
       -- next (drop_unused_queues).
       (SELECT count(*) FROM dead) AS dead_consumers,
       -- (Read, so that the sample is taken: a CTE that only selects runs
       -- when read.)
       (SELECT taken FROM sampled) AS sampled;
