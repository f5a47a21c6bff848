-- 010_dedup_source: publish deduplication keyed on the message whose task
-- run published the task (docs/delivery.md, "Exactly-once chain hand-off").
--
-- Design notes
-- * Before, a Celery task message was a duplicate when its (task id,
--   retries) had been published before with the same routing, by anyone.
--   That dropped legitimate publications of a task id again: Task.replace
--   (the replacement keeps the task's id, retries 0), a retry of a
--   replacement, an explicit task_id reused after forget(), a task resent
--   after being revoked or lost; get() then waited forever.
-- * The duplicate this exists for is narrower: a worker that published a
--   chain's next link (a callback, a retry, a replacement) while running
--   message M dies before acknowledging M; M is redelivered (same row id:
--   recovery hands the row back, it is not published again), runs again,
--   and publishes the same task again. So a publication is now recorded
--   with its source: 'run <id>', the id of the message whose task run made
--   it (the transport hands every delivered message its row id, and reads
--   it back from Celery's current task request when that task publishes;
--   see pgbroker/broker/messages.py, _publication_source), or 'copy <delivery
--   tag>' for a copy of a delivered message (celery migrate passes the
--   copied message's properties on; a Redis message keeps its tag), so
--   that a migration run again stores nothing twice. A publication is a
--   duplicate only if the same (task id, retries, source) was published
--   before, with the same routing.
-- * Other publications (clients, beat, a task id reused, a resend) have no
--   source: never deduplicated, and no row is written.
-- * Rows written before this migration have no source and could never
--   match again: they go. (A task whose worker died after its hand-off
--   just before the upgrade, and runs again after it, hands off again.)

TRUNCATE {schema}.published_task;
ALTER TABLE {schema}.published_task
    ADD COLUMN source text NOT NULL,
    DROP CONSTRAINT published_task_pkey,
    ADD PRIMARY KEY (task_id, retries, source);
