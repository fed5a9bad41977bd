-- The event store: one table for every aggregate's events, in the layout postgres-es reads and
-- writes, extended with the columns the global log needs. Every added column has a default, so
-- a plain postgres-es insert still works.
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 1) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        jsonb                        NOT NULL,
    metadata       jsonb                        NOT NULL,
    -- Identity of the event for consumers (CloudEvents id, inbox keys).
    event_id       uuid                         NOT NULL DEFAULT gen_random_uuid(),
    recorded_at    timestamptz                  NOT NULL DEFAULT now(),
    -- The writing transaction. Readers of the global log only read rows whose transaction is
    -- below the snapshot's xmin, so a transaction that commits late is never skipped
    -- (docs/adr/0002-global-log-order.md).
    transaction_id xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    -- Allocation order; unique, but gaps and out-of-commit-order values are normal.
    position       bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence),
    CONSTRAINT events_event_id_unique UNIQUE (event_id),
    CONSTRAINT events_position_unique UNIQUE (position)
);

-- The global reader's cursor: (transaction_id, position) in commit-safe order.
CREATE INDEX events_global_order ON events (transaction_id, position);

-- Snapshots of hot aggregates (inventory). One row per aggregate; compatible with postgres-es.
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          jsonb                                NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Answers to commands sent with an Idempotency-Key, written in the same transaction as the
-- events the command produced: either both exist or neither does.
CREATE TABLE idempotency_keys
(
    caller       text        NOT NULL,
    key          text        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request_hash bytea       NOT NULL,
    status_code  smallint    NOT NULL,
    location     text,
    response     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
