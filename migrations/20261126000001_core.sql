-- skald's own tables, in their own schema. One row per saga instance, one per
-- consumed message (the inbox), one per attempt of a step or compensation.
CREATE SCHEMA IF NOT EXISTS skald;

CREATE TABLE skald.instances (
    id               uuid PRIMARY KEY,
    saga             text        NOT NULL,
    saga_version     integer     NOT NULL,
    aggregate_id     text        NOT NULL,
    status           text        NOT NULL
        CHECK (status IN ('running', 'compensating', 'completed', 'compensated', 'failed')),
    -- The cursor: what the instance runs next (or ran last, once terminal).
    step             integer     NOT NULL CHECK (step >= 0),
    phase            text        NOT NULL CHECK (phase IN ('forward', 'compensate')),
    attempt          integer     NOT NULL CHECK (attempt >= 1),
    payload          jsonb       NOT NULL,
    -- Columns captured by steps' `returning`, keyed by step name.
    outputs          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    start_message_id uuid        NOT NULL UNIQUE,
    sequence         bigint,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX instances_saga_status ON skald.instances (saga, status);
CREATE INDEX instances_aggregate ON skald.instances (aggregate_id, created_at);

-- Every message whose handling committed. A redelivered copy finds its row here and
-- is disposed of; `outgoing` holds what the first handling sent, so that a copy
-- redelivered after a crash between commit and publish still sends it.
CREATE TABLE skald.inbox (
    message_id   uuid PRIMARY KEY,
    instance_id  uuid,
    disposition  text        NOT NULL CHECK (disposition IN ('applied', 'skipped')),
    outgoing     jsonb       NOT NULL DEFAULT '[]'::jsonb,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE skald.step_attempts (
    id           bigserial PRIMARY KEY,
    instance_id  uuid        NOT NULL REFERENCES skald.instances (id),
    step         integer     NOT NULL,
    step_name    text        NOT NULL,
    phase        text        NOT NULL CHECK (phase IN ('forward', 'compensate')),
    attempt      integer     NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    error_kind   text CHECK (error_kind IN ('retryable', 'fatal')),
    error        text,
    message_id   uuid        NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX step_attempts_instance ON skald.step_attempts (instance_id, id);
