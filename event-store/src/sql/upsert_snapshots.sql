INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
SELECT s.aggregate_type, s.aggregate_id, s.last_sequence, 1, s.payload
  FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[])
       AS s(aggregate_type, aggregate_id, last_sequence, payload)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
   SET last_sequence = EXCLUDED.last_sequence,
       current_snapshot = snapshots.current_snapshot + 1,
       payload = EXCLUDED.payload
 WHERE snapshots.last_sequence < EXCLUDED.last_sequence
