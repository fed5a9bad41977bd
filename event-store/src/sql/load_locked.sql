WITH s AS (SELECT aggregate_id, last_sequence, payload FROM snapshots
            WHERE aggregate_type = $1 AND aggregate_id = ANY($2) AND $3)
SELECT aggregate_id, last_sequence, NULL::bigint AS sequence, NULL::text, NULL::text,
       payload::text, NULL::bytea, NULL::bool
  FROM s
UNION ALL
SELECT e.aggregate_id, NULL, e.sequence, e.event_type, e.event_version, e.payload::text, e.hash,
       e.transaction_id > pg_current_xact_id_if_assigned()
  FROM unnest($2::text[]) AS ids(id)
  LEFT JOIN s ON s.aggregate_id = ids.id
  -- Per aggregate, so the snapshot's sequence bounds the index scan of its stream.
  CROSS JOIN LATERAL (SELECT * FROM events e
                       WHERE e.aggregate_type = $1 AND e.aggregate_id = ids.id
                         AND e.sequence >= coalesce(s.last_sequence, 0)) AS e
ORDER BY 1, 3 NULLS FIRST
