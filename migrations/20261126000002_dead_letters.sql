-- Dead letters: messages that cannot be processed (malformed, unprocessable) and
-- instances parked for a person (a compensation or a post-pivot step failed for
-- good). Never erased: replay and discard are recorded on the row.
CREATE TABLE skald.dead_letters (
    id           uuid PRIMARY KEY,
    kind         text        NOT NULL
        CHECK (kind IN ('malformed', 'unprocessable', 'exhausted', 'compensation_failed')),
    reason_code  text        NOT NULL,
    reason       text        NOT NULL,
    -- The message as received (malformed: the raw bytes, whatever they are).
    body         bytea       NOT NULL,
    message_id   uuid,
    instance_id  uuid,
    saga         text,
    -- Every failed attempt of the instance, oldest first.
    history      jsonb       NOT NULL DEFAULT '[]'::jsonb,
    status       text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'replayed', 'discarded')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    resolved_by  text,
    -- What the operator did: the edited payload, a note.
    resolution   jsonb,
    -- The message a replay sent; a repeated replay sends it again (same id, so the
    -- inbox drops it if the first one arrived).
    replay       jsonb,
    -- For malformed/unprocessable letters: the (possibly edited) body a replay sent.
    replay_body  bytea
);
CREATE INDEX dead_letters_status ON skald.dead_letters (status, created_at);
CREATE INDEX dead_letters_instance ON skald.dead_letters (instance_id);
