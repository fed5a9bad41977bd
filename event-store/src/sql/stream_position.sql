SELECT max(position) FROM events WHERE aggregate_type = $1 AND aggregate_id = $2
