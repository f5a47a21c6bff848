-- Every query pgbroker runs, by name. `{schema}` is replaced by the quoted
-- schema identifier; values are always bound parameters.

-- name: register_consumer
-- A consumer is a session holding the advisory lock (schema oid, consumer
-- id). The lock is taken in the same statement that creates the row, so no
-- sweep can ever see the row without the lock.
WITH c AS (
    INSERT INTO {schema}.consumer (hostname, pid)
    VALUES (%(hostname)s, %(pid)s)
    RETURNING id
)
SELECT id, pg_advisory_lock(%(lock_class)s, id) FROM c;

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
INSERT INTO {schema}.queue (name, durable, auto_delete, message_ttl, expires, arguments)
VALUES (%(name)s, %(durable)s, %(auto_delete)s,
        make_interval(secs => %(message_ttl)s), make_interval(secs => %(expires)s),
        %(arguments)s)
ON CONFLICT (name) DO UPDATE SET last_used_at = now()
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
-- Route one message and store a copy in every matching queue, in one
-- statement. The anonymous exchange ('') routes to the queue named by the
-- routing key; other exchanges route through the bindings table. A
-- persistent message that matches nothing goes to dead_letter; a transient
-- one is dropped, as AMQP does.
WITH target AS (
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
), stored AS (
    INSERT INTO {schema}.message (
        queue, priority, expires_at, exchange, routing_key, task_id, task_name,
        content_type, content_encoding, headers, properties, body)
    SELECT t.queue, %(priority)s,
           now() + least(make_interval(secs => %(ttl)s), t.message_ttl),
           %(exchange)s, %(routing_key)s, %(task_id)s, %(task_name)s,
           %(content_type)s, %(content_encoding)s, %(headers)s, %(properties)s, %(body)s
    FROM target t
    RETURNING queue
), unroutable AS (
    INSERT INTO {schema}.dead_letter (
        reason, published_at, exchange, routing_key, task_id, task_name, priority,
        content_type, content_encoding, headers, properties, body)
    SELECT 'unroutable', now(), %(exchange)s, %(routing_key)s, %(task_id)s, %(task_name)s,
           %(priority)s, %(content_type)s, %(content_encoding)s, %(headers)s,
           %(properties)s, %(body)s
    WHERE %(persistent)s AND NOT EXISTS (SELECT 1 FROM target)
    RETURNING id
)
SELECT (SELECT count(*) FROM stored) AS routed,
       (SELECT count(*) FROM unroutable) AS dead_lettered,
       (SELECT count(pg_notify(%(channel)s, s.queue))
        FROM (SELECT DISTINCT queue FROM stored) s) AS notified;

-- name: claim
-- Reserve up to `limit` ready messages of one queue for this consumer, in
-- service order (priority 9 first, then oldest first). The inner SELECT walks
-- the message_ready index and stops at `limit`; SKIP LOCKED lets many
-- consumers claim from one queue without waiting on each other. The ids go
-- through an array rather than a join, so that even a generic plan (which
-- cannot know `limit`) fetches them by primary key instead of hashing the
-- whole table.
UPDATE {schema}.message m
SET state = 'reserved', consumer_id = %(consumer_id)s, claimed_at = now(),
    delivery_count = m.delivery_count + 1
WHERE m.id = ANY (ARRAY (
    SELECT id
    FROM {schema}.message
    WHERE queue = %(queue)s AND state = 'ready'
      AND (expires_at IS NULL OR expires_at > now())
    ORDER BY priority DESC, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))
RETURNING m.id, m.priority, m.delivery_count, m.exchange, m.routing_key,
          m.content_type, m.content_encoding, m.headers, m.properties, m.body;

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
          m.content_type, m.content_encoding, m.headers, m.properties, m.body;

-- name: ack
-- Fenced: only the consumer that holds a message can acknowledge it.
DELETE FROM {schema}.message
WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer_id)s;

-- name: requeue
-- Fenced like ack. The message keeps its id, so it goes back to its place.
WITH back AS (
    UPDATE {schema}.message
    SET state = 'ready', consumer_id = NULL
    WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer_id)s
    RETURNING queue
)
SELECT count(pg_notify(%(channel)s, b.queue)) FROM (SELECT DISTINCT queue FROM back) b;

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
-- A message rejected without requeue is kept in dead_letter, not dropped.
WITH gone AS (
    DELETE FROM {schema}.message
    WHERE id = ANY(%(ids)s) AND consumer_id = %(consumer_id)s
    RETURNING *
)
INSERT INTO {schema}.dead_letter (
    reason, queue, delivery_count, published_at, exchange, routing_key, task_id,
    task_name, priority, content_type, content_encoding, headers, properties, body)
SELECT 'rejected', queue, delivery_count, published_at, exchange, routing_key, task_id,
       task_name, priority, content_type, content_encoding, headers, properties, body
FROM gone;

-- name: size
SELECT count(*) FROM {schema}.message WHERE queue = %(queue)s AND state = 'ready';

-- name: purge
DELETE FROM {schema}.message WHERE queue = %(queue)s AND state = 'ready';

-- name: attach_queue
WITH touched AS (
    UPDATE {schema}.queue SET last_used_at = now() WHERE name = %(queue)s
)
INSERT INTO {schema}.consumer_queue (consumer_id, queue)
VALUES (%(consumer_id)s, %(queue)s)
ON CONFLICT DO NOTHING;

-- name: detach_queue
WITH touched AS (
    UPDATE {schema}.queue SET last_used_at = now() WHERE name = %(queue)s
)
DELETE FROM {schema}.consumer_queue
WHERE consumer_id = %(consumer_id)s AND queue = %(queue)s;

-- name: sweep
-- The safety sweep, one statement every sweep_interval seconds:
-- 1. consumers whose session is gone (their advisory lock is free) are
--    removed and the messages they held go back to their queues, logged in
--    redelivery. Only rows still owned by a dead consumer are touched, so a
--    message a live consumer has since claimed is never taken from it.
-- 2. expired ready messages (TTL) are removed;
-- 3. queues unused for longer than their x-expires are removed with all
--    their messages (as AMQP deletes a queue's unacked messages with it, so
--    none is left behind in a queue that no longer exists); a queue whose
--    consumer just died gets a fresh last_used_at instead, so its expiry
--    counts from the death.
WITH dead AS (
    SELECT c.id
    FROM {schema}.consumer c
    WHERE NOT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory'
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = %(lock_oid)s::oid
          AND l.objid = c.id::oid AND l.objsubid = 2 AND l.granted)
), expired_queues AS (
    DELETE FROM {schema}.queue q
    WHERE q.expires IS NOT NULL AND q.last_used_at + q.expires < now()
      AND NOT EXISTS (SELECT 1 FROM {schema}.consumer_queue cq WHERE cq.queue = q.name)
    RETURNING q.name
), requeued AS (
    UPDATE {schema}.message m
    SET state = 'ready', consumer_id = NULL
    FROM dead
    WHERE m.state = 'reserved' AND m.consumer_id = dead.id
      AND m.queue NOT IN (SELECT name FROM expired_queues)
    RETURNING m.id, m.queue, m.task_id, m.delivery_count, dead.id AS consumer_id
), logged AS (
    INSERT INTO {schema}.redelivery (reason, message_id, queue, task_id, consumer_id, delivery_count)
    SELECT 'consumer died', id, queue, task_id, consumer_id, delivery_count FROM requeued
), gone_consumers AS (
    DELETE FROM {schema}.consumer c USING dead WHERE c.id = dead.id
), orphaned_queues AS (
    UPDATE {schema}.queue q SET last_used_at = now()
    FROM {schema}.consumer_queue cq JOIN dead ON dead.id = cq.consumer_id
    WHERE q.name = cq.queue AND q.expires IS NOT NULL
), dropped_ready AS (
    -- (Two statements so that each uses its partial index.)
    DELETE FROM {schema}.message m
    WHERE m.queue IN (SELECT name FROM expired_queues) AND m.state = 'ready'
), dropped_unready AS (
    DELETE FROM {schema}.message m
    WHERE m.queue IN (SELECT name FROM expired_queues) AND m.state <> 'ready'
), expired_messages AS (
    DELETE FROM {schema}.message m
    WHERE m.expires_at <= now() AND m.state = 'ready'
      AND m.queue NOT IN (SELECT name FROM expired_queues)
    RETURNING 1
)
SELECT (SELECT count(*) FROM requeued) AS requeued,
       (SELECT count(*) FROM expired_messages) AS expired_messages,
       (SELECT count(*) FROM expired_queues) AS expired_queues,
       (SELECT count(pg_notify(%(channel)s, r.queue))
        FROM (SELECT DISTINCT queue FROM requeued) r) AS notified;
