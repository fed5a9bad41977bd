-- Partitioned log processing (ADR 11). Every consumer is split into partitions by a hash of
-- the event's aggregate id; each partition has its own checkpoint row and lease and finds its
-- events through an index, without reading anyone else's.

-- The key every consumer partitions by, computed once at write time. An order and its payment
-- share the id, so they land in the same partition of every consumer.
ALTER TABLE events ADD COLUMN key_hash integer GENERATED ALWAYS AS (hashtext(aggregate_id)) STORED;

-- How many partitions the log has (a power of two): one value for every process of the
-- database. A process started with more splits every partition (event_log::partitions).
CREATE TABLE log_partitions
(
    single     boolean PRIMARY KEY DEFAULT true CHECK (single),
    partitions integer NOT NULL CHECK (partitions BETWEEN 1 AND 256 AND partitions & (partitions - 1) = 0)
);
INSERT INTO log_partitions (partitions) VALUES (16);

-- A partition's events in log order: `key_hash & (partitions - 1)` is the partition.
CREATE INDEX events_partition_16 ON events ((key_hash & 15), transaction_id, position);

-- Per consumer: what it is and whether a rebuild of it runs. Its partitions are rows of
-- `checkpoints`.
CREATE TABLE consumers
(
    consumer         text PRIMARY KEY,
    -- projection | saga | relay | notifications | ...
    kind             text NOT NULL DEFAULT 'consumer',
    -- Set while a rebuild of this projection runs; the position it has reached.
    rebuild_position bigint
);
INSERT INTO consumers (consumer) SELECT consumer FROM checkpoints;

-- One row per (consumer, partition). An unpartitioned checkpoint becomes 16 with the same
-- cursor: each partition has applied exactly what the whole consumer had. Every lease ends
-- (a higher token), so a process of the previous version commits nothing more.
ALTER TABLE checkpoints ADD COLUMN partition integer NOT NULL DEFAULT 0 CHECK (partition >= 0);
ALTER TABLE checkpoints DROP CONSTRAINT checkpoints_pkey;
ALTER TABLE checkpoints ADD PRIMARY KEY (consumer, partition);
ALTER TABLE checkpoints DROP COLUMN rebuild_position;
INSERT INTO checkpoints (consumer, partition, transaction_id, position, state, last_error,
                         last_error_at, parked_position, fencing_token)
SELECT c.consumer, p.partition, c.transaction_id, c.position, c.state, c.last_error,
       c.last_error_at, c.parked_position, c.fencing_token
  FROM checkpoints c CROSS JOIN generate_series(1, 15) AS p(partition);
UPDATE checkpoints SET owner = NULL, lease_until = NULL, fencing_token = fencing_token + 1;

-- The processes following the log, one row per process and consumer it runs: each renews its
-- rows while it lives. A consumer's partitions are shared out evenly among its rows whose
-- `alive_until` has not passed.
CREATE TABLE log_processes
(
    owner       text        NOT NULL,
    consumer    text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    alive_until timestamptz NOT NULL,
    PRIMARY KEY (consumer, owner)
);

-- Wake-ups name the low 8 bits of the key hashes that were written (at most 256 values, well
-- inside NOTIFY's 8000-byte payload), so a process wakes only the partitions that have
-- something to read: with at most 256 partitions, those bits hold the partition.
CREATE OR REPLACE FUNCTION notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('orderline_events', string_agg(DISTINCT (key_hash & 255)::text, ','))
       FROM inserted;
    RETURN NULL;
END $$;
DROP TRIGGER events_notify ON events;
CREATE TRIGGER events_notify AFTER INSERT ON events REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_events();

-- Writers of the log announce themselves before their transaction has an id (a shared
-- advisory lock, class 8106, key 0), so that readers wait only for them (ADR 11). An insert
-- by a transaction that did not is refused rather than risk being skipped.
CREATE FUNCTION events_require_writer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_locks
                    WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND granted
                      AND classid = 8106 AND objid = 0 AND objsubid = 2) THEN
        RAISE EXCEPTION 'a transaction that appends events must first take the writer lock (SELECT pg_advisory_xact_lock_shared(8106, 0)) before it writes anything'
            USING ERRCODE = '55000';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER events_require_writer BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_require_writer();
