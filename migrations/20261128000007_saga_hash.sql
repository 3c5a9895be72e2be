-- The identity by content of the definition an instance started with: SHA-256 (hex) of
-- the normalised definition (see SagaDef::content_hash). NULL for instances started
-- before it was recorded. `skald run` refuses a saga file whose version number is in
-- the database with another hash: same version, different content.
ALTER TABLE skald.instances ADD COLUMN saga_hash text;
