-- Tamper evidence (ADR 9): each event's SHA-256 over its content and the previous event's hash
-- in the same stream, computed by the application and written in the same insert. NULL for
-- events written by other means (postgres-es directly); `orderline verify` reports those.
ALTER TABLE events ADD COLUMN hash bytea;
