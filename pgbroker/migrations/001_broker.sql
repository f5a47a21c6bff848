-- 001_broker: the Kombu transport's tables.
--
-- Design notes
-- * A message row is inserted once per destination queue and deleted when it
--   is acknowledged, so the hot table stays as small as the backlog.
-- * state says where a message is: 'ready' (claimable), 'reserved' (claimed
--   by a consumer, not yet acked) or 'delayed' (invisible until visible_at).
--   Only ready rows are in the claim index, so reserved and delayed rows
--   never slow the claim down, however many there are.
-- * A consumer is one PostgreSQL session. It holds a session advisory lock
--   keyed on (schema oid, consumer id) for as long as it lives; Postgres
--   drops the lock when the session ends, which is how a crashed consumer is
--   detected within one sweep instead of after a visibility timeout.

CREATE TABLE {schema}.queue (
    name          text PRIMARY KEY,
    durable       boolean NOT NULL DEFAULT true,
    auto_delete   boolean NOT NULL DEFAULT false,
    -- x-message-ttl: a message older than this is removed unread.
    message_ttl   interval,
    -- x-expires: the queue is removed once unused (no consumer, no declare)
    -- for this long.
    expires       interval,
    arguments     jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.exchange (
    name         text PRIMARY KEY,
    type         text NOT NULL CHECK (type IN ('direct', 'topic', 'fanout')),
    durable      boolean NOT NULL DEFAULT true,
    auto_delete  boolean NOT NULL DEFAULT false,
    arguments    jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Bindings live here, not in process memory, so a binding made by one
-- process (a pidbox reply queue, an event receiver) routes messages that
-- any other process publishes.
CREATE TABLE {schema}.binding (
    exchange     text NOT NULL REFERENCES {schema}.exchange (name) ON DELETE CASCADE,
    routing_key  text NOT NULL,
    queue        text NOT NULL REFERENCES {schema}.queue (name) ON DELETE CASCADE,
    -- Topic exchanges: the binding key as an anchored regular expression
    -- (built by pgbroker.broker.routing), matched with ~ at publish time.
    pattern      text,
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE INDEX binding_queue ON {schema}.binding (queue);

CREATE TABLE {schema}.consumer (
    id             integer GENERATED ALWAYS AS IDENTITY (MAXVALUE 2147483647 CYCLE) PRIMARY KEY,
    hostname       text NOT NULL,
    pid            integer NOT NULL,
    backend_pid    integer NOT NULL DEFAULT pg_backend_pid(),
    started_at     timestamptz NOT NULL DEFAULT now()
);

-- Which queues a live consumer listens to: a queue with x-expires is not
-- removed while a consumer is attached.
CREATE TABLE {schema}.consumer_queue (
    consumer_id  integer NOT NULL REFERENCES {schema}.consumer (id) ON DELETE CASCADE,
    queue        text NOT NULL,
    PRIMARY KEY (consumer_id, queue)
);
CREATE INDEX consumer_queue_queue ON {schema}.consumer_queue (queue);

CREATE TABLE {schema}.message (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue             text NOT NULL,
    state             text NOT NULL DEFAULT 'ready'
                      CHECK (state IN ('ready', 'reserved', 'delayed')),
    -- 0..9, higher is served first (AMQP order).
    priority          smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    consumer_id       integer,
    delivery_count    integer NOT NULL DEFAULT 0,
    published_at      timestamptz NOT NULL DEFAULT now(),
    claimed_at        timestamptz,
    visible_at        timestamptz,
    expires_at        timestamptz,
    exchange          text NOT NULL,
    routing_key       text NOT NULL,
    -- Celery's task id and name, copied out of the headers so that
    -- operators can find a task's messages with plain SQL.
    task_id           text,
    task_name         text,
    content_type      text,
    content_encoding  text,
    -- json, not jsonb: Celery copies the arguments' repr into the headers,
    -- and a string argument may hold U+0000, which jsonb cannot store. (The
    -- text is kept as sent, which also costs less to write and to read.)
    headers           json NOT NULL,
    properties        json NOT NULL,
    body              bytea NOT NULL,
    CHECK ((state = 'reserved') = (consumer_id IS NOT NULL))
);
-- The claim path: ready rows of one queue in service order.
CREATE INDEX message_ready ON {schema}.message (queue, priority DESC, id)
    WHERE state = 'ready';
-- Everything not ready, by queue: deleting a queue must not scan the table.
CREATE INDEX message_unready ON {schema}.message (queue)
    WHERE state <> 'ready';
-- Reserved rows by owner: crash recovery and fenced acks.
CREATE INDEX message_reserved_by ON {schema}.message (consumer_id)
    WHERE state = 'reserved';
-- Ready messages with a TTL, for the sweep that removes expired ones.
CREATE INDEX message_ttl ON {schema}.message (expires_at)
    WHERE expires_at IS NOT NULL AND state = 'ready';
-- A queue table churns: vacuum it early and often.
ALTER TABLE {schema}.message SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

-- Messages that must not be lost but cannot be delivered: persistent
-- messages that matched no binding, messages rejected without requeue.
CREATE TABLE {schema}.dead_letter (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason            text NOT NULL,
    died_at           timestamptz NOT NULL DEFAULT now(),
    queue             text,
    delivery_count    integer NOT NULL DEFAULT 0,
    published_at      timestamptz NOT NULL,
    exchange          text NOT NULL,
    routing_key       text NOT NULL,
    task_id           text,
    task_name         text,
    priority          smallint NOT NULL DEFAULT 0,
    content_type      text,
    content_encoding  text,
    headers           json NOT NULL,  -- as in message
    properties        json NOT NULL,
    body              bytea NOT NULL
);
CREATE INDEX dead_letter_died_at ON {schema}.dead_letter (died_at);

-- One row per message handed back to its queue by crash recovery, so users
-- can see what was redelivered, how often and why.
CREATE TABLE {schema}.redelivery (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    reason          text NOT NULL,
    message_id      bigint NOT NULL,
    queue           text NOT NULL,
    task_id         text,
    consumer_id     integer,
    delivery_count  integer NOT NULL
);
CREATE INDEX redelivery_at ON {schema}.redelivery (at);
CREATE INDEX redelivery_task_id ON {schema}.redelivery (task_id) WHERE task_id IS NOT NULL;
