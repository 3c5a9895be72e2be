-- The PostgreSQL transport (SKALD_TRANSPORT=postgres): skald's queues as tables in its
-- own database. An endpoint is a set of queues one kind of consumer reads: 'skald' for
-- skald's intake, a participant service's name otherwise. See docs/design.md.

-- Messages ready to be delivered, oldest (lowest id) first. A row is deleted by the ack
-- of its delivery; until then it belongs to the consumer that holds its partition
-- (key_hash % SKALD_PARTITIONS) under a session advisory lock. Anyone may publish with
-- a plain INSERT (endpoint, key, body): the hash is computed here.
CREATE TABLE skald.queue_messages (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint   text        NOT NULL,
    key        text        NOT NULL,
    -- PostgreSQL's own text hash (the one hash partitioning uses, stable across
    -- versions), made non-negative: the partition is key_hash % partitions.
    key_hash   bigint      NOT NULL
        GENERATED ALWAYS AS (hashtextextended(key, 0) & 9223372036854775807) STORED,
    body       bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- The consumer's fetch: an endpoint's messages in id order.
CREATE INDEX queue_messages_next ON skald.queue_messages (endpoint, id) INCLUDE (key_hash);
-- A queue table turns over all the time: vacuum it early so that dead tuples (acked
-- rows) do not pile up in front of the fetch.
ALTER TABLE skald.queue_messages SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

-- Delayed messages (retries waiting out their backoff): moved into queue_messages, with
-- a new id (behind what is already queued, as a broker's delay queue would), once
-- due_at has passed, never before.
CREATE TABLE skald.queue_delayed (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint   text        NOT NULL,
    key        text        NOT NULL,
    body       bytea       NOT NULL,
    due_at     timestamptz NOT NULL
);
CREATE INDEX queue_delayed_due ON skald.queue_delayed (endpoint, due_at);

-- Every insert (a publish, a batch of them, delayed messages coming due) wakes the
-- endpoint's idle consumers: one notification per statement and endpoint, payload
-- 'r:<endpoint>' for ready messages, 'd:<endpoint>' for delayed ones.
CREATE FUNCTION skald.queue_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('skald_queue', TG_ARGV[0] || ':' || endpoint)
       FROM (SELECT DISTINCT endpoint FROM arrived) e;
    RETURN NULL;
END
$$;
CREATE TRIGGER queue_messages_notify AFTER INSERT ON skald.queue_messages
    REFERENCING NEW TABLE AS arrived
    FOR EACH STATEMENT EXECUTE FUNCTION skald.queue_notify('r');
CREATE TRIGGER queue_delayed_notify AFTER INSERT ON skald.queue_delayed
    REFERENCING NEW TABLE AS arrived
    FOR EACH STATEMENT EXECUTE FUNCTION skald.queue_notify('d');

-- Per partition, the highest message id ever handed out: a new owner flags deliveries
-- up to it as redelivered (a hint, as a broker's redelivered flag is).
CREATE TABLE skald.queue_marks (
    endpoint       text   NOT NULL,
    partition      int    NOT NULL,
    delivered_upto bigint NOT NULL,
    PRIMARY KEY (endpoint, partition)
);

-- The transport's dead-letter store (as RabbitMQ's `NS.dead` queue): the body and its
-- reason, kept durably. skald's engine records the same letter in skald.dead_letters,
-- which is what the dashboard and `skald dlq` list; this table is only counted in the
-- queue depths (`<endpoint>.dead`), so nothing is listed twice.
CREATE TABLE skald.queue_dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint    text        NOT NULL,
    reason_code text        NOT NULL,
    reason      text        NOT NULL,
    body        bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_dead_letters_endpoint ON skald.queue_dead_letters (endpoint, id);
