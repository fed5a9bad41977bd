-- The read side: readers of the global log are woken on commit, consumers keep checkpoints, and
-- projections keep read models. Read-model tables are only ever written by their projection.

-- Wake readers when events commit. NOTIFY is delivered at commit and collapsed per transaction,
-- so one statement-level notification per insert costs next to nothing.
CREATE FUNCTION notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('orderline_events', '');
    RETURN NULL;
END $$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_events();

-- One row per consumer of the log (projection, saga, relay). The cursor is the composite
-- (transaction_id, position) of the last event applied; it moves in the same transaction as
-- the consumer's own writes.
CREATE TABLE checkpoints
(
    consumer        text PRIMARY KEY,
    transaction_id  xid8        NOT NULL DEFAULT '0',
    position        bigint      NOT NULL DEFAULT 0,
    events_applied  bigint      NOT NULL DEFAULT 0,
    -- running | parked (a poison event stopped it; see last_error)
    state           text        NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'parked')),
    last_error      text,
    last_error_at   timestamptz,
    -- The event the consumer is parked on.
    parked_position bigint,
    -- Set while a rebuild of this projection runs; the position it has reached.
    rebuild_position bigint,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Orders: one row per order, for GET /api/v1/orders/{id} and the lists by customer.
CREATE TABLE rm_orders
(
    order_id        uuid PRIMARY KEY,
    customer_id     text        NOT NULL,
    status          text        NOT NULL,
    reason          text,
    lines           jsonb       NOT NULL,
    total           jsonb       NOT NULL,
    history         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    -- Position of OrderPlaced: the stable sort key of the lists.
    placed_position bigint      NOT NULL
);
CREATE INDEX rm_orders_by_customer ON rm_orders (customer_id, placed_position DESC);
CREATE INDEX rm_orders_by_placement ON rm_orders (placed_position DESC);

-- Inventory: one row per SKU, for the catalog (GET /api/v1/products) and stock levels
-- (GET /api/v1/inventory).
CREATE TABLE rm_inventory
(
    sku                 text PRIMARY KEY,
    name                text   NOT NULL,
    price               jsonb  NOT NULL,
    on_hand             bigint NOT NULL,
    reserved            bigint NOT NULL,
    available           bigint NOT NULL,
    low_stock_threshold bigint NOT NULL,
    low_stock           boolean NOT NULL
);
CREATE INDEX rm_inventory_low_stock ON rm_inventory (sku) WHERE low_stock;

-- Payments: one row per order's payment, with the order's customer for ownership checks.
CREATE TABLE rm_payments
(
    order_id    uuid PRIMARY KEY,
    customer_id text,
    status      text        NOT NULL,
    amount      jsonb,
    captured    bigint      NOT NULL,
    refunded    bigint      NOT NULL,
    attempts    jsonb       NOT NULL,
    history     jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL
);
