-- A poison event parks its key (the aggregate id), not its partition (ADR 11): the key's later
-- events wait behind it, in order, while every other key of the partition flows on.

-- One row per parked key of a consumer. Owned by event_log::parked.
CREATE TABLE parked_keys
(
    consumer       text        NOT NULL,
    -- The aggregate id the consumer partitions by.
    key            text        NOT NULL,
    -- hashtext(key), as events.key_hash: `key_hash & (partitions - 1)` is its partition.
    key_hash       integer     NOT NULL,
    -- The key's first event not applied yet: the poison event while it stays parked. Every
    -- event of the key from here up to its partition's checkpoint waits for a retry.
    transaction_id xid8        NOT NULL,
    position       bigint      NOT NULL,
    error          text        NOT NULL,
    -- Failed attempts at that event, the runner's and each retry's.
    attempts       integer     NOT NULL DEFAULT 0,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    -- `retry` (from the event at the cursor) or `skip` (from the one after it) once an
    -- operator asked; the partition's runner clears it when the key is done or fails again.
    action         text CHECK (action IN ('retry', 'skip')),
    requested_by   text,
    requested_at   timestamptz,
    PRIMARY KEY (consumer, key)
);

-- Every change to a partition's parked keys bumps this in the same transaction, under the
-- partition's row lock, so a page read with an outdated set of parked keys is not committed.
ALTER TABLE checkpoints ADD COLUMN parked_version bigint NOT NULL DEFAULT 0;

-- A partition parked by an earlier version becomes its poison event's key, parked.
INSERT INTO parked_keys (consumer, key, key_hash, transaction_id, position, error, attempts)
SELECT DISTINCT ON (c.consumer, e.aggregate_id)
       c.consumer, e.aggregate_id, e.key_hash, e.transaction_id, e.position,
       coalesce(c.last_error, 'parked by an earlier version'), 1
  FROM checkpoints c
  JOIN events e ON e.position = c.parked_position
 WHERE c.state = 'parked'
 ORDER BY c.consumer, e.aggregate_id, e.position;
-- Its checkpoint moves just past the poison event, which the parked key now holds.
UPDATE checkpoints c
   SET transaction_id = e.transaction_id, position = e.position, parked_version = 1
  FROM events e
 WHERE c.state = 'parked' AND e.position = c.parked_position;

ALTER TABLE checkpoints DROP COLUMN state;
ALTER TABLE checkpoints DROP COLUMN parked_position;
