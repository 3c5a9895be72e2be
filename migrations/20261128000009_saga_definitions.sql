-- Every saga definition skald ran, by (saga, version, hash): the normalised definition
-- (SagaDef::normalised) that instances.saga_hash names. `skald diff` compares the
-- files on disk with the definitions live instances are running.
CREATE TABLE skald.saga_definitions (
    saga            text        NOT NULL,
    version         integer     NOT NULL,
    hash            text        NOT NULL,
    definition      jsonb       NOT NULL,
    first_loaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga, version, hash)
);
