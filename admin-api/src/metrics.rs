//! `GET /metrics`: Prometheus text exposition, computed from the database on each scrape, so
//! every process reports the same numbers and none has to be the one scraped.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use api_common::error::ApiError;

use crate::AdminState;
use event_log::checkpoints::{self, PartitionProgress, Progress};

/// The metrics: the log's head, each consumer's position, lag (events, seconds), events applied
/// and parked state (projections, the saga, the Kafka relay, labelled with their kind), each
/// partition's position, lag, owner and fencing token, sagas and notifications by state.
///
/// # Errors
/// 500 when the database cannot be read.
pub async fn metrics(State(state): State<AdminState>) -> Result<impl IntoResponse, ApiError> {
    let head = event_log::head_position(&mut *state.pool.acquire().await?).await?;
    let consumers = checkpoints::progress(&state.pool).await?;
    let sagas = sagas::store::count_live(&state.pool).await?;
    let notifications = integrations::notifications::count_waiting(&state.pool).await?;

    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            out.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    let by_consumer = |f: &dyn Fn(&Progress) -> String| {
        consumers
            .iter()
            .map(|c| {
                (
                    format!("{{consumer=\"{}\",kind=\"{}\"}}", c.name, c.kind),
                    f(c),
                )
            })
            .collect::<Vec<_>>()
    };
    let by_partition = |f: &dyn Fn(&PartitionProgress) -> String| {
        consumers
            .iter()
            .flat_map(|c| {
                c.partitions.iter().map(|p| {
                    (
                        format!(
                            "{{consumer=\"{}\",partition=\"{}\",owner=\"{}\"}}",
                            c.name,
                            p.partition,
                            p.owner.as_deref().unwrap_or("")
                        ),
                        f(p),
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    family(
        "orderline_log_head_position",
        "gauge",
        "Position of the newest event in the log.",
        vec![(String::new(), head.to_string())],
    );
    family(
        "orderline_consumer_position",
        "gauge",
        "Position of the last event a log consumer applied.",
        by_consumer(&|c| c.position.to_string()),
    );
    family(
        "orderline_consumer_lag_events",
        "gauge",
        "Events in the log a consumer has not applied yet.",
        by_consumer(&|c| c.lag.to_string()),
    );
    family(
        "orderline_consumer_lag_seconds",
        "gauge",
        "Age of the oldest event a consumer has not applied yet.",
        by_consumer(&|c| c.lag_seconds.to_string()),
    );
    family(
        "orderline_consumer_events_applied_total",
        "counter",
        "Events a consumer has applied.",
        by_consumer(&|c| c.events_applied.to_string()),
    );
    family(
        "orderline_partition_position",
        "gauge",
        "Position of the last event a partition of a consumer applied, with its lease's owner.",
        by_partition(&|p| p.position.to_string()),
    );
    family(
        "orderline_partition_lag_events",
        "gauge",
        "Events of a partition a consumer has not applied yet (exact when small, an upper bound beyond).",
        by_partition(&|p| p.lag.to_string()),
    );
    family(
        "orderline_partition_fencing_token",
        "gauge",
        "The fencing token of a partition's lease: one more on every takeover.",
        by_partition(&|p| p.fencing_token.to_string()),
    );
    family(
        "orderline_consumer_parked",
        "gauge",
        "1 while a consumer has a key parked on a poison event.",
        by_consumer(&|c| u8::from(c.state == "parked").to_string()),
    );
    family(
        "orderline_consumer_parked_keys",
        "gauge",
        "Keys a consumer parked on a poison event (their later events wait; GET /api/v1/admin/parked).",
        by_consumer(&|c| c.parked_keys.to_string()),
    );
    family(
        "orderline_sagas",
        "gauge",
        "Fulfillment sagas in flight, by state (completed ones are not counted).",
        sagas
            .into_iter()
            .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n.to_string()))
            .collect(),
    );
    family(
        "orderline_notifications",
        "gauge",
        "Notifications pending or parked, by state (sent ones are not counted).",
        notifications
            .into_iter()
            .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n.to_string()))
            .collect(),
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
