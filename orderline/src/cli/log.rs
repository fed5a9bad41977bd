//! Reading the log (`events`, `audit`, `state`), proving it intact (`verify`) and moving it
//! between databases (`export`, `import`). The work is in the `audit` crate; this prints it.

use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::ProgressBar;
use uuid::Uuid;

use audit::filter::EventFilter;
use audit::history::{self, At};
use audit::report::{self, Outcome};
use orderline::database::{self, with_database, Signal, Stop};
use orderline::settings::Settings;

use super::{say, NotIntact};

/// `orderline events`: the log filtered, listed or (with `follow`) tailed live.
pub async fn events(
    settings: &Settings,
    signal: Signal,
    filter: EventFilter,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    // Ctrl-C is how a follow ends: that is success.
    let stop = if follow { Stop::Succeeds } else { Stop::Fails };
    with_database(settings, signal, stop, |pool| async move {
        if follow {
            let mut failed = None;
            audit::filter::follow(&pool, &filter, |e| match print_event(e, json) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            })
            .await?;
            if let Some(e) = failed {
                return Err(e.into());
            }
        } else {
            for event in audit::filter::events(&pool, &filter).await? {
                print_event(&event, json)?;
            }
        }
        Ok(())
    })
    .await
}

/// `orderline audit order ID`: the order's whole story.
pub async fn audit(
    settings: &Settings,
    signal: Signal,
    id: Uuid,
    json: bool,
) -> anyhow::Result<()> {
    with_database(settings, signal, Stop::Fails, |pool| async move {
        let story = audit::filter::order_story(&pool, id).await?;
        anyhow::ensure!(!story.is_empty(), "no order {id}");
        for event in &story {
            print_event(event, json)?;
        }
        Ok(())
    })
    .await
}

/// `orderline state TYPE/ID [--at T | --version N]`: time travel.
pub async fn state(
    settings: &Settings,
    signal: Signal,
    (aggregate_type, id): (String, String),
    at: Option<DateTime<Utc>>,
    version: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    let at = match (at, version) {
        (Some(t), _) => At::Time(t),
        (None, Some(n)) => At::Version(n),
        (None, None) => At::Latest,
    };
    with_database(settings, signal, Stop::Fails, |pool| async move {
        let state = history::state_at(&pool, &aggregate_type, &id, at)
            .await?
            .with_context(|| format!("{aggregate_type}/{id} had no event by then"))?;
        if json {
            say(serde_json::to_string_pretty(&state)?)?;
        } else {
            say(format!(
                "{}/{} at version {} (recorded {})",
                state.aggregate_type, state.aggregate_id, state.version, state.recorded_at
            ))?;
            say(serde_json::to_string_pretty(&state.state)?)?;
        }
        Ok(())
    })
    .await
}

/// `orderline export [--since N]`: the log as NDJSON on standard output.
pub async fn export(settings: &Settings, signal: Signal, since: i64) -> anyhow::Result<()> {
    with_database(settings, signal, Stop::Fails, |pool| async move {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let written = audit::transfer::export(&pool, since, |event| -> anyhow::Result<()> {
            serde_json::to_writer(&mut out, event)?;
            out.write_all(b"\n")?;
            Ok(())
        })
        .await?;
        out.flush()?;
        tracing::info!(events = written, "exported");
        Ok(())
    })
    .await
}

/// `orderline import FILE`: an export into an empty database, migrated first.
pub async fn import(settings: &Settings, signal: Signal, file: &Path) -> anyhow::Result<()> {
    with_database(settings, signal, Stop::Fails, |pool| async move {
        database::migrate(&pool).await?;
        let reader = std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
        );
        let imported = audit::transfer::import(&pool, std::io::BufRead::lines(reader)).await?;
        say(format!("imported {imported} events"))?;
        Ok(())
    })
    .await
}

/// `orderline verify`: prints the [`report::Report`]; [`NotIntact`] (exit 1) when it found a
/// fault.
pub async fn verify(settings: &Settings, signal: Signal, json: bool) -> anyhow::Result<()> {
    with_database(settings, signal, Stop::Fails, |pool| async move {
        let bar = ProgressBar::new_spinner();
        let report = report::verify_all(&pool, &|n| {
            bar.set_message(format!("{n} events checked"));
        })
        .await?;
        bar.finish_and_clear();
        match json {
            true => say(verdict_json(&report))?,
            false => {
                for line in verdict_lines(&report) {
                    say(line)?;
                }
            }
        }
        match report.intact() {
            true => Ok(()),
            false => Err(NotIntact.into()),
        }
    })
    .await
}

/// The report as one JSON object: `ok`, and either `first_bad_event`, the differing
/// projection, or the counts and each projection's outcome.
fn verdict_json(report: &report::Report) -> serde_json::Value {
    use serde_json::json;
    let verified = match &report.log {
        Err(finding) => return json!({ "ok": false, "first_bad_event": finding }),
        Ok(verified) => verified,
    };
    let mut checked = Vec::new();
    for p in &report.projections {
        match &p.outcome {
            Outcome::Same { rows } => checked.push(json!({ "name": p.name, "rows": rows })),
            Outcome::Skipped { why } => checked.push(json!({ "name": p.name, "skipped": why })),
            Outcome::Differs {
                missing,
                unexpected,
                example,
            } => {
                return json!({ "ok": false, "projection": p.name, "missing": missing,
                               "unexpected": unexpected, "example": example })
            }
        }
    }
    json!({ "ok": true, "events": verified.events, "streams": verified.streams,
            "projections": checked })
}

/// The report as lines for people: `FAILED: ...` first when something is wrong.
fn verdict_lines(report: &report::Report) -> Vec<String> {
    let verified = match &report.log {
        Err(finding) => return vec![format!("FAILED: {finding}")],
        Ok(verified) => verified,
    };
    let mut lines = Vec::new();
    for p in &report.projections {
        let name = &p.name;
        match &p.outcome {
            Outcome::Same { rows } => {
                lines.push(format!(
                    "ok: projection {name} matches the log ({rows} rows)"
                ));
            }
            Outcome::Skipped { why } => lines.push(format!("skipped: projection {name}: {why}")),
            Outcome::Differs {
                missing,
                unexpected,
                example,
            } => {
                return vec![format!(
                    "FAILED: projection {name} differs from a fold of the log: {missing} rows \
                     missing or different, {unexpected} unexpected; e.g. {example}"
                )]
            }
        }
    }
    lines.insert(
        0,
        format!(
            "ok: {} events in {} streams, every hash chain intact",
            verified.events, verified.streams
        ),
    );
    lines
}

/// Prints one event as a line of text or a JSON object.
fn print_event(event: &event_log::LogEvent, json: bool) -> std::io::Result<()> {
    if json {
        say(serde_json::to_string(event).unwrap_or_default())
    } else {
        say(audit::filter::line(event))
    }
}
