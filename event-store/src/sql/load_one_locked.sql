WITH s AS (SELECT last_sequence, payload FROM snapshots
            WHERE aggregate_type = $1 AND aggregate_id = $2 AND $3)
SELECT $1::text, $2::text, last_sequence, NULL::bigint AS sequence, NULL::text, NULL::text, payload::text,
       NULL::bytea, NULL::bool
  FROM s
UNION ALL
SELECT $1::text, $2::text, NULL, e.sequence, e.event_type, e.event_version, e.payload::text, e.hash,
       e.transaction_id > pg_current_xact_id_if_assigned()
  FROM events e
 WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
   AND e.sequence >= coalesce((SELECT last_sequence FROM s), 0)
ORDER BY 4 NULLS FIRST
