-- 012_sessions_lost: a consumer's session lost while its process lives is
-- not a death (docs/delivery.md, "Lost sessions").
--
-- A message delivered max_deliveries times without an ack is dead-lettered:
-- it keeps killing its worker. But a consumer's session can also end while
-- its process lives (pg_terminate_backend, a network failure, a proxy's or
-- the server's timeout, a server restart); its messages go back to their
-- queues as after a death, and those deliveries must not count.
--
-- How the sweep tells the two apart: every transport session of a process
-- holds a shared advisory lock (schema oid, process key), the key being a
-- random negative integer per process (pgbroker.database.forking.process_key;
-- consumer ids are positive, the sweeper roles use 0 and -1).
-- consumer_process records each consumer's process key. When a consumer's
-- own lock is gone but its process's key is still held by another session
-- (a Celery worker's publisher, its new consumer after a reconnection),
-- only the session was lost: its messages go back with reason 'session
-- lost' in redelivery, and max_deliveries counts a message's deliveries
-- minus those (found through the index below; they are looked up only when
-- a message reaches max_deliveries).
--
-- The sessions of a killed process end one by one, within milliseconds when
-- they are idle: the sweeper thread waits a moment before it sweeps a newly
-- dead consumer (pgbroker.broker.sweeper.SETTLE_SECONDS). Its own session does not
-- hold the key: it is inside sweeper_wait, and would notice its process's
-- death only up to 250 ms later. A process whose only session was lost is
-- seen as dead by a sweep that runs before it reconnects: that delivery
-- counts, as before.
--
-- (A table of its own rather than a column: views of 008_operations use the
-- consumer and message row types, which forbids adding columns to them.)
CREATE TABLE {schema}.consumer_process (
    consumer_id  integer PRIMARY KEY REFERENCES {schema}.consumer (id) ON DELETE CASCADE,
    process_key  integer NOT NULL
);

CREATE INDEX redelivery_session_lost ON {schema}.redelivery (message_id)
    WHERE reason = 'session lost';
