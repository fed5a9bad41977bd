//! `orderline verify`, whole: the log's hash chains and decoding ([`crate::verify`]), then each
//! projection's live table against a fold of the log (`projections::rebuild::compare`). The
//! caller prints the [`Report`]; nothing here writes to the live tables.

use serde::Serialize;
use sqlx::PgPool;

use projections::rebuild::{self, Comparison, RebuildLock};

use crate::verify::{self, Finding, Verified};

/// What `orderline verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The log's verdict: intact, or its first bad event (then no projection was compared).
    pub log: Result<Verified, Finding>,
    /// One entry per projection, in [`projections::all`] order, until the first that differs.
    pub projections: Vec<ProjectionCheck>,
}

impl Report {
    /// Whether the log and every read model that could be compared are intact.
    pub fn intact(&self) -> bool {
        self.log.is_ok()
            && self
                .projections
                .iter()
                .all(|p| !matches!(p.outcome, Outcome::Differs { .. }))
    }
}

/// One projection's comparison with the log.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionCheck {
    /// The projection's name.
    pub name: String,
    /// What the comparison found.
    pub outcome: Outcome,
}

/// How a projection compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Row for row the same as a fold of the log.
    Same {
        /// Rows compared.
        rows: i64,
    },
    /// Not compared, and why (a rebuild runs, or the projection is behind the log).
    Skipped {
        /// Why it was not compared, in words.
        why: String,
    },
    /// Differs from a fold of the log.
    Differs {
        /// Rows of the fold the live table lacks or has otherwise.
        missing: i64,
        /// Rows of the live table the fold does not have.
        unexpected: i64,
        /// One differing row, as JSON.
        example: String,
    },
}

/// Verifies the log, then compares each projection with it (stopping at the first that
/// differs). `progress` is called with the number of events checked so far.
///
/// # Errors
/// The database or projection error when something cannot be read at all.
pub async fn verify_all(
    pool: &PgPool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, rebuild::RebuildError> {
    let log = verify::verify(pool, progress).await?;
    let mut report = Report {
        log,
        projections: Vec::new(),
    };
    if report.log.is_err() {
        return Ok(report);
    }
    for projection in projections::all() {
        let name = projection.name().to_owned();
        let outcome = match RebuildLock::acquire(pool, projection.as_ref()).await {
            Err(e) => Outcome::Skipped { why: e.to_string() },
            Ok(lock) => match rebuild::compare(pool, projection.as_ref(), lock).await? {
                Comparison::Same { rows } => Outcome::Same { rows },
                Comparison::Behind { position, head } => Outcome::Skipped {
                    why: format!(
                        "behind the log (at {position} of {head}); run or replay it first"
                    ),
                },
                Comparison::Differs {
                    missing,
                    unexpected,
                    example,
                } => Outcome::Differs {
                    missing,
                    unexpected,
                    example,
                },
            },
        };
        let differs = matches!(outcome, Outcome::Differs { .. });
        report.projections.push(ProjectionCheck { name, outcome });
        if differs {
            break;
        }
    }
    Ok(report)
}
