-- Integrators built on orderline's Kafka topics (integrations/). Each keeps an inbox of the
-- event ids it has handled, written in the same transaction as the handler's own effects, so a
-- redelivered event (the relay is at least once) changes nothing.
CREATE TABLE inbox (
    consumer    text        NOT NULL,
    event_id    uuid        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- The notifications integrator: who placed each order (order events carry only the order id).
CREATE TABLE notification_recipients (
    order_id    uuid PRIMARY KEY,
    customer_id text NOT NULL
);

-- One message per notifying event, sent by the sender loop with retries; a message that keeps
-- failing is parked with its error, never dropped.
CREATE TABLE notifications (
    event_id        uuid        PRIMARY KEY,
    kind            text        NOT NULL,
    recipient       text        NOT NULL,
    subject         text        NOT NULL,
    body            text        NOT NULL,
    state           text        NOT NULL DEFAULT 'pending'
                                CHECK (state IN ('pending', 'sent', 'parked')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);

CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';
