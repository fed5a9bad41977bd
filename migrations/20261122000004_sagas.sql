-- The fulfillment saga's own state, one row per order. Written in the same transaction as the
-- saga's checkpoint (when it reacts to an order event) or as the events a gateway answer leads
-- to (when the gateway worker records one), never on its own.
CREATE TABLE sagas (
    order_id    uuid        PRIMARY KEY,
    -- running | compensating | confirmed | settling | completed | stuck (SagaState::as_str)
    state       text        NOT NULL,
    -- When the pending gateway call may run; NULL when the saga waits for nothing external.
    due_at      timestamptz,
    -- When authorization gives up; NULL outside authorization.
    deadline    timestamptz,
    -- The whole state machine (sagas::fulfillment::Fulfillment) as JSON.
    data        jsonb       NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The gateway worker's queue: what is due, oldest first.
CREATE INDEX sagas_due ON sagas (due_at) WHERE due_at IS NOT NULL;
-- The admin listing by state, newest first.
CREATE INDEX sagas_state ON sagas (state, started_at DESC, order_id);

-- Wake the gateway worker when a call becomes due. Delivered at commit, collapsed per
-- transaction; the worker also polls, so a lost notification only costs latency.
CREATE FUNCTION notify_saga_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('orderline_saga_due', '');
    RETURN NULL;
END $$;

CREATE TRIGGER sagas_notify_due AFTER INSERT OR UPDATE OF due_at ON sagas
    FOR EACH ROW WHEN (NEW.due_at IS NOT NULL) EXECUTE FUNCTION notify_saga_due();
