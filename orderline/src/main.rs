//! `orderline`: serve the API, projections and sagas, apply migrations, rebuild read models, or
//! mint a token.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use api_common::auth::{Role, TokenKeys};
use event_store::{history, transfer, verify};
use indicatif::{ProgressBar, ProgressStyle};
use orderline::local_postgres::{self, LocalPostgres};
use orderline::settings::{Database, Gateway, Settings};
use orderline::{audit, Application, Parts};
use projections::rebuild::{self, RebuildLock};
use sagas::fulfillment::Timing;
use sagas::gateway::simulated::SimulatedGateway;
use sagas::gateway::stripe::{StripeConfig, StripeGateway};
use sagas::gateway::PaymentGateway;
use sagas::runtime::SagaConfig;

/// orderline: an event-sourced order engine.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply pending migrations, then run the HTTP API until SIGTERM or Ctrl-C.
    Serve {
        /// Run only this part (several processes may share one database).
        #[arg(long, value_enum)]
        only: Option<Part>,
    },
    /// Apply pending migrations and exit.
    Migrate,
    /// The log, filtered: one stream, one flow (correlation id), after a position; --follow
    /// tails it live.
    Events {
        /// One stream, as TYPE/ID (e.g. inventory/MUG-1).
        #[arg(long, value_parser = audit::parse_stream)]
        aggregate: Option<(String, String)>,
        /// One flow: every event with this correlation id.
        #[arg(long)]
        correlation: Option<uuid::Uuid>,
        /// Only events after this global position.
        #[arg(long)]
        after: Option<i64>,
        /// Keep printing events as they commit (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// One JSON object per event instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// An order's timeline across every stream it touched, with who did what.
    Audit {
        /// What to audit: `order`.
        #[arg(value_parser = ["order"])]
        kind: String,
        /// The order id.
        id: uuid::Uuid,
        /// One JSON object per event instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// An aggregate as it was at a version or a time (now by default).
    State {
        /// The stream, as TYPE/ID.
        #[arg(value_parser = audit::parse_stream)]
        stream: (String, String),
        /// An RFC 3339 time, e.g. 2026-11-22T14:03:00Z.
        #[arg(long, conflicts_with = "version")]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// An event number, 1 or more.
        #[arg(long)]
        version: Option<i64>,
        /// Print only the JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Check every stream (no gaps, every event readable) and its hash chain; names the first
    /// bad event and exits with 1.
    Verify {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the log as NDJSON to standard output, one event per line, exactly as stored.
    Export {
        /// Only events after this global position.
        #[arg(long, default_value_t = 0)]
        since: i64,
    },
    /// Load an export into an empty database (migrating it first): the same streams,
    /// positions and hash chains.
    Import {
        /// The NDJSON file written by `orderline export`.
        file: std::path::PathBuf,
    },
    /// Rebuild read models from the start of the log; the live ones keep serving until the
    /// rebuilt ones take their place.
    Replay {
        /// The projection to rebuild: orders, inventory or payments.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Rebuild every projection, one after the other.
        #[arg(long)]
        all: bool,
    },
    /// Print a token signed with the configured secret (ORDERLINE_JWT_SECRET).
    Token {
        /// The subject: a customer id, an admin's or a service's name.
        #[arg(long)]
        sub: String,
        /// customer, admin or service.
        #[arg(long)]
        role: Role,
        /// Lifetime such as 30m, 1h or 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

/// Parts of the server that can run alone.
#[derive(Clone, Copy, ValueEnum)]
enum Part {
    /// The HTTP API.
    Api,
    /// The projections following the log (no HTTP listener).
    Projections,
    /// The fulfillment saga: its log consumer and its gateway worker (no HTTP listener).
    Sagas,
    /// The Kafka relay (no HTTP listener; needs ORDERLINE_KAFKA_BROKERS).
    Relay,
    /// The notifications integrator: reads the Kafka topics and sends e-mail (or logs) when
    /// orders are confirmed, rejected, cancelled or shipped and when stock runs low. Needs
    /// ORDERLINE_KAFKA_BROKERS; runs only when asked for.
    Notifications,
}

impl Part {
    fn parts(only: Option<Part>) -> Parts {
        match only {
            None => Parts::ALL,
            Some(Part::Api) => Parts {
                api: true,
                ..Parts::NONE
            },
            Some(Part::Projections) => Parts {
                projections: true,
                ..Parts::NONE
            },
            Some(Part::Sagas) => Parts {
                sagas: true,
                ..Parts::NONE
            },
            Some(Part::Relay) => Parts {
                relay: true,
                ..Parts::NONE
            },
            Some(Part::Notifications) => Parts::NONE,
        }
    }
}

fn parse_ttl(raw: &str) -> Result<Duration, String> {
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?}: expected a number and a unit, e.g. 1h"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{raw:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let settings = Settings::from_env().context("invalid configuration")?;
    match cli.command {
        Cmd::Token { sub, role, ttl } => {
            let keys = TokenKeys::hs256(settings.jwt_secret.expose().as_bytes());
            let token = keys.mint(&sub, role, ttl)?;
            #[expect(clippy::print_stdout, reason = "the token is the command's output")]
            {
                println!("{token}");
            }
            Ok(())
        }
        Cmd::Migrate => {
            let (pool, local) = open_database(&settings).await?;
            event_store::MIGRATOR
                .run(&pool)
                .await
                .context("migration failed")?;
            tracing::info!("migrations applied");
            pool.close().await;
            if let Some(local) = local {
                local.stop().await;
            }
            Ok(())
        }
        Cmd::Serve {
            only: Some(Part::Notifications),
        } => notifications(settings).await,
        Cmd::Events {
            aggregate,
            correlation,
            after,
            follow,
            json,
        } => {
            let filter = audit::EventFilter {
                aggregate,
                correlation,
                after,
            };
            with_database(&settings, |pool| async move {
                if follow {
                    audit::follow(&pool, &filter, |e| print_event(e, json)).await?;
                } else {
                    for event in audit::events(&pool, &filter).await? {
                        print_event(&event, json);
                    }
                }
                Ok(())
            })
            .await
        }
        Cmd::Audit { id, json, .. } => {
            with_database(&settings, |pool| async move {
                let story = audit::order_story(&pool, id).await?;
                anyhow::ensure!(!story.is_empty(), "no order {id}");
                for event in &story {
                    print_event(event, json);
                }
                Ok(())
            })
            .await
        }
        Cmd::State {
            stream: (aggregate_type, id),
            at,
            version,
            json,
        } => {
            let at = match (at, version) {
                (Some(t), _) => history::At::Time(t),
                (None, Some(n)) => history::At::Version(n),
                (None, None) => history::At::Latest,
            };
            with_database(&settings, |pool| async move {
                let state = history::state_at(&pool, &aggregate_type, &id, at)
                    .await?
                    .with_context(|| format!("{aggregate_type}/{id} had no event by then"))?;
                #[expect(clippy::print_stdout, reason = "the state is the command's output")]
                if json {
                    println!("{}", serde_json::to_string_pretty(&state)?);
                } else {
                    println!(
                        "{}/{} at version {} (recorded {})",
                        state.aggregate_type, state.aggregate_id, state.version, state.recorded_at
                    );
                    println!("{}", serde_json::to_string_pretty(&state.state)?);
                }
                Ok(())
            })
            .await
        }
        Cmd::Export { since } => {
            with_database(&settings, |pool| async move {
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                let written = transfer::export(&pool, since, |event| -> anyhow::Result<()> {
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
        Cmd::Import { file } => {
            with_database(&settings, |pool| async move {
                event_store::MIGRATOR.run(&pool).await.context("migration failed")?;
                let reader = std::io::BufReader::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("cannot open {}", file.display()))?,
                );
                let imported =
                    transfer::import(&pool, std::io::BufRead::lines(reader)).await?;
                #[expect(clippy::print_stdout, reason = "the count is the command's output")]
                {
                    println!("imported {imported} events");
                }
                Ok(())
            })
            .await
        }
        Cmd::Verify { json } => {
            with_database(&settings, |pool| async move {
                let bar = ProgressBar::new_spinner();
                let outcome = verify::verify(&pool, &|n| {
                    bar.set_message(format!("{n} events checked"));
                })
                .await?;
                bar.finish_and_clear();
                let verified = match outcome {
                    Ok(verified) => verified,
                    Err(finding) => {
                        return Err(fail(
                            json,
                            serde_json::json!({ "first_bad_event": finding }),
                            &format!("FAILED: {finding}"),
                        ))
                    }
                };
                let mut checked = Vec::new();
                for projection in projections::all() {
                    let name = projection.name();
                    let lock = match RebuildLock::acquire(&pool, projection.as_ref()).await {
                        Ok(lock) => lock,
                        Err(e) => {
                            checked.push(serde_json::json!({ "name": name, "skipped": e.to_string() }));
                            continue;
                        }
                    };
                    match rebuild::compare(&pool, projection.as_ref(), lock).await? {
                        rebuild::Comparison::Same { rows } => {
                            checked.push(serde_json::json!({ "name": name, "rows": rows }));
                        }
                        rebuild::Comparison::Behind { position, head } => {
                            let why = format!("behind the log (at {position} of {head}); run or replay it first");
                            checked.push(serde_json::json!({ "name": name, "skipped": why }));
                        }
                        rebuild::Comparison::Differs { missing, unexpected, example } => return Err(fail(
                            json,
                            serde_json::json!({ "projection": name, "missing": missing, "unexpected": unexpected, "example": example }),
                            &format!("FAILED: projection {name} differs from a fold of the log: {missing} rows missing or different, {unexpected} unexpected; e.g. {example}"),
                        )),
                    }
                }
                #[expect(clippy::print_stdout, reason = "the verdict is the command's output")]
                if json {
                    println!("{}", serde_json::json!({ "ok": true, "events": verified.events, "streams": verified.streams, "projections": checked }));
                } else {
                    println!("ok: {} events in {} streams, every hash chain intact", verified.events, verified.streams);
                    for p in &checked {
                        let name = p["name"].as_str().unwrap_or_default();
                        match (p.get("rows"), p["skipped"].as_str()) {
                            (Some(rows), _) => println!("ok: projection {name} matches the log ({rows} rows)"),
                            (_, Some(why)) => println!("skipped: projection {name}: {why}"),
                            _ => {}
                        }
                    }
                }
                Ok(())
            })
            .await
        }
        Cmd::Serve { only } => serve(settings, Part::parts(only)).await,
        Cmd::Replay { name, all } => {
            let chosen = match (name, all) {
                (_, true) => projections::all(),
                (Some(name), false) => vec![projections::by_name(&name).with_context(|| {
                    format!("no projection named {name:?}; use orders, inventory or payments")
                })?],
                (None, false) => unreachable!("clap requires a name or --all"),
            };
            let (pool, local) = open_database(&settings).await?;
            event_store::MIGRATOR
                .run(&pool)
                .await
                .context("migration failed")?;
            let result = replay(&pool, chosen).await;
            pool.close().await;
            if let Some(local) = local {
                local.stop().await;
            }
            result
        }
    }
}

/// Rebuilds each projection in turn with a progress bar.
async fn replay(
    pool: &sqlx::PgPool,
    chosen: Vec<std::sync::Arc<dyn projections::Projection>>,
) -> anyhow::Result<()> {
    for projection in chosen {
        let name = projection.name();
        let lock = RebuildLock::acquire(pool, projection.as_ref()).await?;
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
            )?
            .progress_chars("=> "),
        );
        bar.set_prefix(name);
        let done = rebuild::rebuild(pool, projection.as_ref(), lock, &|events, head| {
            bar.set_length(u64::try_from(head).unwrap_or(0).max(events));
            bar.set_position(events);
        })
        .await?;
        bar.finish_and_clear();
        tracing::info!(
            projection = name,
            events = done.events,
            events_per_second = done.events_per_second.round(),
            "rebuilt and swapped in"
        );
    }
    Ok(())
}

async fn serve(settings: Settings, parts: Parts) -> anyhow::Result<()> {
    if settings.jwt_secret_is_default {
        tracing::warn!("ORDERLINE_JWT_SECRET is unset: using the development secret; never do this in production");
    }
    let (pool, local) = open_database(&settings).await?;
    event_store::MIGRATOR
        .run(&pool)
        .await
        .context("migration failed")?;
    let keys = TokenKeys::hs256(settings.jwt_secret.expose().as_bytes());
    let gateway: Arc<dyn PaymentGateway> = match &settings.gateway {
        Gateway::Simulated => Arc::new(SimulatedGateway::new(pool.clone())),
        Gateway::Stripe { base_url, api_key } => Arc::new(
            StripeGateway::new(StripeConfig {
                base_url: base_url.clone(),
                api_key: api_key.expose().to_owned(),
                timeout: Duration::from_secs(10),
            })
            .context("cannot set up the Stripe client")?,
        ),
    };
    let saga = SagaConfig {
        timing: Timing {
            authorization_deadline: chrono::Duration::from_std(settings.authorization_deadline)
                .context("ORDERLINE_AUTHORIZATION_DEADLINE_SECS is out of range")?,
            ..Timing::default()
        },
        ..SagaConfig::default()
    };
    let app = Application::new(settings.addr, pool.clone(), keys, parts)
        .await
        .with_context(|| format!("cannot listen on {}", settings.addr))?
        .with_gateway(gateway)
        .with_saga_config(saga)
        .with_kafka(settings.kafka.clone())
        .with_cors_origins(&settings.cors_origins);
    if let Ok(addr) = app.local_addr() {
        tracing::info!(%addr, "orderline is listening");
    }
    if parts.projections {
        tracing::info!("projections are following the log");
    }
    if parts.sagas {
        tracing::info!(gateway = ?settings.gateway, "the fulfillment saga is running");
    }
    if parts.relay
        && parts
            == (Parts {
                relay: true,
                ..Parts::NONE
            })
        && settings.kafka.is_none()
    {
        anyhow::bail!("--only relay needs ORDERLINE_KAFKA_BROKERS");
    }
    app.run_until(shutdown_signal()).await?;
    tracing::info!("shutting down");
    pool.close().await;
    if let Some(local) = local {
        local.stop().await;
    }
    Ok(())
}

/// Prints a failed verification and answers the error that makes the command exit with 1
/// (after the database is closed and a private cluster stopped).
fn fail(json: bool, detail: serde_json::Value, text: &str) -> anyhow::Error {
    #[expect(clippy::print_stdout, reason = "the verdict is the command's output")]
    if json {
        let mut verdict = serde_json::json!({ "ok": false });
        if let (Some(v), Some(d)) = (verdict.as_object_mut(), detail.as_object()) {
            v.extend(d.clone());
        }
        println!("{verdict}");
    } else {
        println!("{text}");
    }
    anyhow::anyhow!("verification failed")
}

/// Prints one event as a line of text or a JSON object; always `true` (go on).
fn print_event(event: &event_store::log::LogEvent, json: bool) -> bool {
    #[expect(clippy::print_stdout, reason = "the events are the command's output")]
    if json {
        println!("{}", serde_json::to_string(event).unwrap_or_default());
    } else {
        println!("{}", audit::line(event));
    }
    true
}

/// Opens the database (applying no migration), runs `work`, and closes it.
async fn with_database<F, Fut>(settings: &Settings, work: F) -> anyhow::Result<()>
where
    F: FnOnce(sqlx::PgPool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (pool, local) = open_database(settings).await?;
    let result = work(pool.clone()).await;
    pool.close().await;
    if let Some(local) = local {
        local.stop().await;
    }
    result
}

/// `serve --only notifications`: the notifications integrator until SIGTERM or Ctrl-C.
async fn notifications(settings: Settings) -> anyhow::Result<()> {
    use integrations::inbox::{InboxConfig, InboxConsumer};
    use integrations::notifications::{
        LogNotifier, NotificationsHandler, Notifier, Sender, SenderConfig, SmtpNotifier,
    };
    let kafka = settings
        .kafka
        .clone()
        .context("--only notifications needs ORDERLINE_KAFKA_BROKERS")?;
    let (pool, local) = open_database(&settings).await?;
    event_store::MIGRATOR
        .run(&pool)
        .await
        .context("migration failed")?;
    let notifier: Arc<dyn Notifier> = match settings.smtp.clone() {
        Some(smtp) => {
            tracing::info!(
                host = smtp.host,
                port = smtp.port,
                "notifications go out by SMTP"
            );
            Arc::new(SmtpNotifier::new(smtp))
        }
        None => {
            tracing::info!("ORDERLINE_NOTIFY_SMTP_HOST is unset: notifications go to the log");
            Arc::new(LogNotifier)
        }
    };
    let topics = vec![kafka.topic("order"), kafka.topic("inventory")];
    let consumer = InboxConsumer::spawn(
        pool.clone(),
        &InboxConfig::new(kafka.brokers.clone(), topics),
        Arc::new(NotificationsHandler),
    )
    .context("cannot join the Kafka consumer group")?;
    let sender = Sender::spawn(pool.clone(), notifier, SenderConfig::default());
    tracing::info!("the notifications integrator is running");
    shutdown_signal().await;
    consumer.stop().await;
    sender.stop().await;
    pool.close().await;
    if let Some(local) = local {
        local.stop().await;
    }
    Ok(())
}

/// Connects to `DATABASE_URL`, or starts the private cluster and creates its database.
async fn open_database(
    settings: &Settings,
) -> anyhow::Result<(sqlx::PgPool, Option<LocalPostgres>)> {
    match &settings.database {
        Database::Url(url) => {
            let pool = event_store::connect(url.expose(), settings.pool_size)
                .await
                .context("cannot connect to DATABASE_URL")?;
            Ok((pool, None))
        }
        Database::Local(folder) => {
            let local = LocalPostgres::start(folder).await?;
            let admin = event_store::connect(&local.admin_url(), 1).await?;
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(local_postgres::DATABASE)
                    .fetch_one(&admin)
                    .await?;
            if !exists {
                sqlx::query(&format!("CREATE DATABASE {}", local_postgres::DATABASE))
                    .execute(&admin)
                    .await?;
            }
            admin.close().await;
            let pool = event_store::connect(&local.url(), settings.pool_size).await?;
            Ok((pool, Some(local)))
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_read_like_durations() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
