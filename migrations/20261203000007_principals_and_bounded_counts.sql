-- Idempotency keys are scoped to the principal (`role:sub`), no longer to the bare `sub`
-- (ADR 3). Records written before carry no role: they are kept, marked `?:sub`, and still
-- replayed to that subject, so a client retrying across the upgrade is not applied twice.
UPDATE idempotency_keys SET caller = '?:' || caller;

-- `/metrics` counts the notifications still to send or parked, never the sent history.
CREATE INDEX notifications_unsent ON notifications (state) WHERE state IN ('pending', 'parked');
