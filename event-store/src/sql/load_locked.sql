-- For each aggregate (type $1[i], id $2[i], snapshotted if $3[i]): its snapshot (if any, first,
-- with a NULL sequence), then every event from the snapshot's sequence on (the one at it only
-- gives the hash), each with whether a younger transaction than the current one wrote it.
WITH ids AS (SELECT DISTINCT t, id, snap FROM unnest($1::text[], $2::text[], $3::bool[]) AS i(t, id, snap)),
     s AS (SELECT sn.aggregate_type, sn.aggregate_id, sn.last_sequence, sn.payload
             FROM snapshots sn JOIN ids ON sn.aggregate_type = ids.t AND sn.aggregate_id = ids.id
            WHERE ids.snap)
SELECT aggregate_type, aggregate_id, last_sequence, NULL::bigint AS sequence, NULL::text,
       NULL::text, payload::text, NULL::bytea, NULL::bool
  FROM s
UNION ALL
SELECT e.aggregate_type, e.aggregate_id, NULL, e.sequence, e.event_type, e.event_version,
       e.payload::text, e.hash, e.transaction_id > pg_current_xact_id_if_assigned()
  FROM ids
  LEFT JOIN s ON s.aggregate_type = ids.t AND s.aggregate_id = ids.id
  -- Per aggregate, so the snapshot's sequence bounds the index scan of its stream.
  CROSS JOIN LATERAL (SELECT * FROM events e
                       WHERE e.aggregate_type = ids.t AND e.aggregate_id = ids.id
                         AND e.sequence >= coalesce(s.last_sequence, 0)) AS e
ORDER BY 1, 2, 4 NULLS FIRST
