-- Leases of log consumers are rows, not session advisory locks (ADR 10): an owner, an expiry
-- and a fencing token that grows on every takeover. Each page's transaction checks the token,
-- so a runner that froze and woke after its lease moved on cannot commit.
ALTER TABLE checkpoints
    ADD COLUMN owner         text,
    ADD COLUMN fencing_token bigint NOT NULL DEFAULT 0,
    ADD COLUMN lease_until   timestamptz;
