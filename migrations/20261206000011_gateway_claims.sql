-- A gateway call in flight is claimed by a row, not a session lock (ADR 7): the worker claims
-- due sagas in one statement, makes the calls holding no connection, renews its claims while
-- they run, and records each answer only while its claim token is still on the row. A claim
-- left by a dead or frozen process expires and is taken with a higher token; the call is then
-- made again with the same idempotency key, so the provider charges nothing twice.
ALTER TABLE sagas ADD COLUMN claim_owner text;
ALTER TABLE sagas ADD COLUMN claim_token bigint NOT NULL DEFAULT 0;
ALTER TABLE sagas ADD COLUMN claim_until timestamptz;
