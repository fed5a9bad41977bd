WITH inserted AS (
    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                        payload, metadata, event_id, hash)
    SELECT $1, $2, e.sequence, e.event_type, e.event_version, e.payload, $3, e.event_id, e.hash
      FROM unnest($4::bigint[], $5::text[], $6::text[], $7::jsonb[], $8::uuid[], $9::bytea[])
           AS e(sequence, event_type, event_version, payload, event_id, hash)
    RETURNING position)
SELECT max(position) FROM inserted
