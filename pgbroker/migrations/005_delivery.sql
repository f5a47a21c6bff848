-- 005_delivery: broker-side ETA, exactly-once publication of Celery tasks.
--
-- Design notes
-- * A message published with a future Celery `eta` is stored as 'delayed'
--   with visible_at = eta (columns from 001). It is promoted to 'ready' when
--   due by the consumers of its queue (a timer per consumer, woken by
--   NOTIFY; the sweep promotes too, as a safety net). The index below finds,
--   per queue, the earliest delayed row and the rows now due, touching only
--   delayed rows.
-- * published_task remembers which (task id, retries) were published, so
--   that publishing the same Celery task message again (a chain's next link
--   sent again by a redelivered task) stores nothing. The publish statement
--   inserts here with ON CONFLICT; the sweep deletes rows older than the
--   dedup_window option, a batch at a time.

CREATE INDEX message_delayed ON {schema}.message (queue, visible_at)
    WHERE state = 'delayed';

CREATE TABLE {schema}.published_task (
    task_id       text NOT NULL,
    -- Celery's `retries` header: a retry is a new publication.
    retries       integer NOT NULL,
    -- Where it was published: the same task sent with another routing is a
    -- move (celery.contrib.migrate), not a duplicate, and goes through.
    exchange      text NOT NULL,
    routing_key   text NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, retries)
);
CREATE INDEX published_task_at ON {schema}.published_task (published_at);
