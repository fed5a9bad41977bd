-- The built-in simulated payment gateway keeps what it did here, as a real provider keeps its
-- records: an operation sent again with the same idempotency key gets the same outcome, and an
-- outcome can be asked for by key after the caller crashed. It is not part of the event store.
CREATE TABLE simulated_gateway_operations
(
    idempotency_key text PRIMARY KEY,
    operation       text        NOT NULL,
    token           text,
    amount_minor    bigint      NOT NULL,
    currency        text        NOT NULL,
    -- Calls received with this key.
    calls           integer     NOT NULL DEFAULT 0,
    -- {"authorized": {"reference": …}} | {"declined": {"reason": …}} | {"done": {}}; NULL until decided.
    outcome         jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
