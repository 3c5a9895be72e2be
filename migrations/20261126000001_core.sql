-- skald's own tables, in their own schema: one row per saga instance, and one row
-- per handled message (the inbox, which is also the attempt history).
CREATE SCHEMA IF NOT EXISTS skald;

-- Most updates only move the cursor (no indexed column changes): leave room on each
-- page so that they are HOT updates.
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
    -- The instance id derives from it (UUID v5), so it is unique by construction.
    start_message_id uuid        NOT NULL,
    sequence         bigint,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
) WITH (fillfactor = 80);
CREATE INDEX instances_saga_status ON skald.instances (saga, status);
CREATE INDEX instances_aggregate ON skald.instances (aggregate_id, created_at);

-- Every message whose handling committed, written in the same transaction as the
-- step's effect. A redelivered copy finds its row here and is disposed of;
-- `outgoing` holds what the first handling sent, so that a copy redelivered after a
-- crash between commit and publish still sends it. Rows with disposition 'applied'
-- are the attempts of their instance's steps (and compensations), with their errors.
CREATE TABLE skald.inbox (
    message_id   uuid PRIMARY KEY,
    instance_id  uuid        NOT NULL,
    disposition  text        NOT NULL CHECK (disposition IN ('applied', 'skipped')),
    step         integer,
    step_name    text,
    phase        text CHECK (phase IN ('forward', 'compensate')),
    attempt      integer,
    outcome      text CHECK (outcome IN ('succeeded', 'failed')),
    error_kind   text CHECK (error_kind IN ('retryable', 'fatal')),
    error        text,
    outgoing     jsonb       NOT NULL DEFAULT '[]'::jsonb,
    started_at   timestamptz,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX inbox_instance ON skald.inbox (instance_id, finished_at);
