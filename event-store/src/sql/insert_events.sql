-- One statement for any number of events of any number of aggregates, in the order given:
-- positions follow it, so each stream's events come out of the log in sequence order.
WITH inserted AS (
    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                        payload, metadata, event_id, hash)
    SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
           e.payload, e.metadata, e.event_id, e.hash
      FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::bigint[], $5::text[], $6::text[],
                  $7::jsonb[], $8::uuid[], $9::bytea[]) WITH ORDINALITY
           AS e(aggregate_type, aggregate_id, metadata, sequence, event_type, event_version,
                payload, event_id, hash, n)
     ORDER BY e.n
    RETURNING position)
SELECT max(position) FROM inserted
