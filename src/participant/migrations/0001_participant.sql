-- The participant library's tables, in the service's own database, in a schema of
-- their own. Every table is keyed by service name too, so several services may share
-- one database without meeting.

-- One row per message the service finished with: its handler's effect committed in
-- the same transaction (succeeded), or it failed for good (fatal, exhausted), or it
-- was older than the last one applied for its aggregate (stale). A copy of a message
-- found here runs nothing: its stored reply is sent again.
CREATE TABLE skald_participant.processed (
    service       text        NOT NULL,
    message_id    uuid        NOT NULL,
    type          text        NOT NULL,
    aggregate_id  text        NOT NULL,
    sequence      bigint,
    dispatched_at timestamptz,
    outcome       text        NOT NULL
        CHECK (outcome IN ('succeeded', 'fatal', 'exhausted', 'stale')),
    -- The handler's result (succeeded only).
    outputs       jsonb,
    -- Why it failed or was discarded (every outcome but succeeded).
    error         text,
    -- The reply sent to skald (commands only: messages with reply_to).
    reply         jsonb,
    -- Tries that ran the handler (0 for stale).
    attempts      integer     NOT NULL,
    -- Every failed try, oldest first: [{attempt, at, message}].
    errors        jsonb       NOT NULL DEFAULT '[]',
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, message_id)
);

CREATE INDEX processed_by_aggregate
    ON skald_participant.processed (service, aggregate_id, processed_at);

-- Every failed try of a message (retried, exhausted or fatal), as it happened.
CREATE TABLE skald_participant.failures (
    service      text        NOT NULL,
    message_id   uuid        NOT NULL,
    attempt      integer     NOT NULL,
    type         text        NOT NULL,
    aggregate_id text        NOT NULL,
    retryable    boolean     NOT NULL,
    error        text        NOT NULL,
    failed_at    timestamptz NOT NULL,
    PRIMARY KEY (service, message_id, attempt)
);

-- What the service last applied per aggregate: a message below it is stale.
CREATE TABLE skald_participant.aggregates (
    service            text        NOT NULL,
    aggregate_id       text        NOT NULL,
    last_sequence      bigint,
    last_dispatched_at timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, aggregate_id)
);

-- Messages set apart for a person: malformed bodies, unknown types and messages the
-- database refuses to record at once, retryable failures past the policy.
CREATE TABLE skald_participant.dead_letters (
    id           uuid        PRIMARY KEY,
    service      text        NOT NULL,
    reason_code  text        NOT NULL
        CHECK (reason_code IN ('malformed', 'unknown_type', 'exhausted', 'unprocessable')),
    reason       text        NOT NULL,
    message_id   uuid,
    type         text,
    aggregate_id text,
    body         bytea       NOT NULL,
    body_sha256  bytea       NOT NULL,
    errors       jsonb       NOT NULL DEFAULT '[]',
    status       text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'replayed', 'discarded')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    resolved_by  text,
    note         text
);

-- A body redelivered before its ack (a crash) is dead-lettered once while pending.
CREATE UNIQUE INDEX dead_letters_pending_body
    ON skald_participant.dead_letters (service, body_sha256) WHERE status = 'pending';

CREATE INDEX dead_letters_by_service
    ON skald_participant.dead_letters (service, status, created_at);
