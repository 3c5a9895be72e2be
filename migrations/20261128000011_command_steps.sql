-- Command steps: a step that sends a command to a participant service and ends with
-- the service's reply.
--
-- One row per command (per instance and cursor: step, phase, attempt), written in the
-- transaction that sends it. While `status` is 'waiting' the instance waits at that
-- cursor for the reply; every re-send after a reply timeout sends `body` again (same
-- message id, same dispatched_at) and counts in `sends`.
CREATE TABLE skald.commands (
    id            uuid PRIMARY KEY,
    instance_id   uuid        NOT NULL,
    step          integer     NOT NULL CHECK (step >= 0),
    step_name     text        NOT NULL,
    phase         text        NOT NULL CHECK (phase IN ('forward', 'compensate')),
    attempt       integer     NOT NULL CHECK (attempt >= 1),
    service       text        NOT NULL,
    type          text        NOT NULL,
    -- The command as sent (the participant protocol's service message).
    body          jsonb       NOT NULL,
    -- The run message it was sent for: payload, outputs so far, errors, deadline.
    context       jsonb       NOT NULL,
    sends         integer     NOT NULL DEFAULT 1 CHECK (sends >= 1),
    status        text        NOT NULL DEFAULT 'waiting'
        CHECK (status IN ('waiting', 'succeeded', 'failed', 'timed_out', 'cancelled')),
    sent_at       timestamptz NOT NULL DEFAULT now(),
    last_sent_at  timestamptz NOT NULL DEFAULT now(),
    answered_at   timestamptz,
    error         text,
    outputs       jsonb
);
CREATE INDEX commands_instance ON skald.commands (instance_id, sent_at);

-- Every reply delivery skald received, applied or not: 'applied' (it ended its step),
-- 'duplicate' (a copy of an applied reply), 'late' (its command was answered before,
-- or its instance moved on) or 'unknown' (skald sent no such command).
CREATE TABLE skald.replies (
    id            bigserial PRIMARY KEY,
    message_id    uuid        NOT NULL,
    in_reply_to   uuid        NOT NULL,
    instance_id   uuid        NOT NULL,
    service       text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('succeeded', 'failed')),
    disposition   text        NOT NULL
        CHECK (disposition IN ('applied', 'duplicate', 'late', 'unknown')),
    body          jsonb       NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replies_instance ON skald.replies (instance_id, received_at);
CREATE INDEX replies_disposition ON skald.replies (disposition, received_at);

-- An inbox row of a command step's run message (or of a reply timer that re-sent the
-- command) records that the command was sent: outcome 'sent'.
ALTER TABLE skald.inbox DROP CONSTRAINT inbox_outcome_check;
ALTER TABLE skald.inbox ADD CONSTRAINT inbox_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'sent'));
