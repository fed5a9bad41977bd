//! `orderline`: serve the API, projections and sagas, apply migrations, rebuild read models, or
//! mint a token.

use std::process::ExitCode;
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

/// The settings of every command that opens the database.
const DB_HELP: &str = concat!(
    "Settings (environment):\n",
    "  DATABASE_URL          Postgres to use (unset: a private cluster in ORDERLINE_DATA_DIR,\n",
    "                        started for the command and stopped after it)\n",
    "  ORDERLINE_DATA_DIR    folder of the private cluster [default: .orderline]\n",
    "  ORDERLINE_PG_BIN      folder of initdb/pg_ctl [default: newest /usr/lib/postgresql/*/bin]\n",
    "  RUST_LOG              log filter [default: info,sqlx=warn]; NO_COLOR turns colours off\n\n",
    "Exit codes: 0 done (also when the reader of the output stops reading), 2 failed,\n",
    "130 interrupted; verify: 1 when the log or a read model is not intact."
);

/// What every command's help ends with.
const ENV_HELP: &str = concat!(
    "Settings come from the environment (a bad value stops the command, naming it).\n\n",
    "Database:\n",
    "  DATABASE_URL          Postgres to use (unset: a private cluster in ORDERLINE_DATA_DIR)\n",
    "  ORDERLINE_DATA_DIR    folder of the private cluster [default: .orderline]\n",
    "  ORDERLINE_PG_BIN      folder of initdb/pg_ctl [default: newest /usr/lib/postgresql/*/bin]\n",
    "  ORDERLINE_DB_POOL_SIZE  largest number of Postgres connections [default: 16]\n",
    "  RUST_LOG              log filter [default: info,sqlx=warn]; NO_COLOR turns colours off\n\n",
    "Server (serve) and tokens (token): see `orderline serve --help`.\n\n",
    "Exit codes: 0 done, 1 verify found the log or a read model not intact, 2 failed,\n",
    "130 interrupted."
);

/// orderline: an event-sourced order engine.
///
/// Serves the HTTP API with its projections, fulfillment saga and Kafka relay (serve), applies
/// migrations (migrate), shows the log and what happened to an order or an aggregate (events,
/// audit, state), proves the log was not edited (verify), moves it between databases (export,
/// import), rebuilds read models (replay) and mints tokens (token).
#[derive(Parser)]
#[command(version, about, long_about, after_help = ENV_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply pending migrations, then run the HTTP API, the projections, the fulfillment saga
    /// and the Kafka relay until SIGTERM or Ctrl-C.
    #[command(after_help = concat!(
        "Database: DATABASE_URL, ORDERLINE_DATA_DIR, ORDERLINE_PG_BIN, ORDERLINE_DB_POOL_SIZE\n\n",
        "Server:\n",
        "  ORDERLINE_ADDR        where the HTTP API listens [default: 127.0.0.1:8080]\n",
        "  ORDERLINE_JWT_SECRET  HS256 token secret, at least 32 bytes [default: a development secret]\n",
        "  ORDERLINE_CORS_ORIGINS  browser origins allowed to call the API, comma-separated [default: none]\n",
        "  ORDERLINE_PAYMENT_GATEWAY  simulated | stripe [default: simulated]\n",
        "  ORDERLINE_STRIPE_BASE_URL, ORDERLINE_STRIPE_API_KEY  the Stripe-style API (with stripe)\n",
        "  ORDERLINE_AUTHORIZATION_DEADLINE_SECS  how long authorizing may take [default: 60]\n",
        "  ORDERLINE_KAFKA_BROKERS  Kafka for the relay [default: unset, relay off]\n",
        "  ORDERLINE_KAFKA_TOPIC_PREFIX [default: orderline], ORDERLINE_KAFKA_PARTITIONS [default: 6]\n",
        "  ORDERLINE_NOTIFY_SMTP_HOST, ORDERLINE_NOTIFY_SMTP_PORT, ORDERLINE_NOTIFY_FROM,\n",
        "  ORDERLINE_NOTIFY_CUSTOMER_DOMAIN, ORDERLINE_NOTIFY_OPERATORS  (--only notifications)\n",
        "  RUST_LOG              log filter [default: info,sqlx=warn]; NO_COLOR turns colours off"
    ))]
    Serve {
        /// Run only this part (several processes may share one database).
        #[arg(long, value_enum)]
        only: Option<Part>,
    },
    /// Apply pending migrations and exit.
    #[command(after_help = DB_HELP)]
    Migrate,
    /// The log, filtered: one stream, one flow (correlation id), after a position; --follow
    /// tails it live.
    #[command(after_help = DB_HELP)]
    Events {
        /// One stream, as TYPE/ID (e.g. inventory/MUG-1).
        #[arg(long, value_parser = audit::parse_stream)]
        aggregate: Option<(String, String)>,
        /// One flow: every event with this correlation id.
        #[arg(long)]
        correlation: Option<uuid::Uuid>,
        /// Only events whose global position is above POSITION (the `position` a command
        /// answered; it need not exist yet). The HTTP `GET /api/v1/admin/events?after=` takes
        /// a cursor instead: the `next` of the page before.
        #[arg(long, value_name = "POSITION")]
        after: Option<i64>,
        /// Keep printing events as they commit (Ctrl-C to stop, exit 0).
        #[arg(long)]
        follow: bool,
        /// One JSON object per event instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// An order's timeline across every stream it touched, with who did what.
    #[command(after_help = DB_HELP)]
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
    #[command(after_help = DB_HELP)]
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
    /// Check every stream (no gaps, every event readable) and its hash chain, and every read
    /// model against a fold of the log; names the first bad event and exits with 1 (2 when it
    /// could not check, e.g. the database is unreachable).
    #[command(after_help = DB_HELP)]
    Verify {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the log as NDJSON to standard output, one event per line, exactly as stored.
    #[command(after_help = DB_HELP)]
    Export {
        /// Only events after this global position.
        #[arg(long, default_value_t = 0)]
        since: i64,
    },
    /// Load an export into an empty database (migrating it first): the same streams,
    /// positions and hash chains.
    #[command(after_help = DB_HELP)]
    Import {
        /// The NDJSON file written by `orderline export`.
        file: std::path::PathBuf,
    },
    /// Rebuild read models from the start of the log; the live ones keep serving until the
    /// rebuilt ones take their place.
    #[command(after_help = DB_HELP)]
    Replay {
        /// The projection to rebuild: orders, inventory or payments.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Rebuild every projection, one after the other.
        #[arg(long)]
        all: bool,
    },
    /// Print a token signed with the configured secret (ORDERLINE_JWT_SECRET; unset: the
    /// development secret a default `serve` uses).
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

/// The log is not intact, or a read model differs from it: `verify` printed what it found.
#[derive(Debug, thiserror::Error)]
#[error("verification failed")]
struct NotIntact;

/// A CLI command was interrupted (Ctrl-C or SIGTERM) before it finished.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// Exit codes: 0 done (also when the reader of the output went away, as `| head` does),
/// 1 `verify` found the log or a read model not intact, 2 anything else failed (so `verify`
/// could not check), 130 interrupted.
#[tokio::main]
async fn main() -> ExitCode {
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn")),
        )
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<NotIntact>() => ExitCode::from(1),
        Err(e) if e.is::<Interrupted>() => ExitCode::from(130),
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            #[expect(clippy::print_stderr, reason = "the error is what the user must read")]
            {
                eprintln!("Error: {e:?}");
            }
            ExitCode::from(2)
        }
    }
}

/// Whether `error` is stdout's reader having gone away: the command's output was cut short on
/// purpose (`| head`), which is no failure.
fn broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes one line of the command's output; fails (instead of panicking, as `println!` does)
/// when the reader has gone away.
fn say(line: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{line}")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Taken before anything is started, so that a Ctrl-C or SIGTERM arriving while the private
    // cluster starts is not the default "die at once", which would leave it running.
    let signal = shutdown_signal()?;
    let settings = Settings::from_env().context("invalid configuration")?;
    match cli.command {
        Cmd::Token { sub, role, ttl } => {
            let keys = TokenKeys::hs256(settings.jwt_secret.expose().as_bytes());
            let token = keys.mint(&sub, role, ttl)?;
            say(token)?;
            Ok(())
        }
        Cmd::Migrate => {
            with_database(&settings, signal, Stop::Fails, |pool| async move {
                event_store::MIGRATOR
                    .run(&pool)
                    .await
                    .context("migration failed")?;
                tracing::info!("migrations applied");
                Ok(())
            })
            .await
        }
        Cmd::Serve {
            only: Some(Part::Notifications),
        } => notifications(settings, signal).await,
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
            // Ctrl-C is how a follow ends: that is success.
            let stop = if follow { Stop::Succeeds } else { Stop::Fails };
            with_database(&settings, signal, stop, |pool| async move {
                if follow {
                    let mut failed = None;
                    audit::follow(&pool, &filter, |e| match print_event(e, json) {
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
                    for event in audit::events(&pool, &filter).await? {
                        print_event(&event, json)?;
                    }
                }
                Ok(())
            })
            .await
        }
        Cmd::Audit { id, json, .. } => {
            with_database(&settings, signal, Stop::Fails, |pool| async move {
                let story = audit::order_story(&pool, id).await?;
                anyhow::ensure!(!story.is_empty(), "no order {id}");
                for event in &story {
                    print_event(event, json)?;
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
            with_database(&settings, signal, Stop::Fails, |pool| async move {
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
        Cmd::Export { since } => {
            with_database(&settings, signal, Stop::Fails, |pool| async move {
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
            with_database(&settings, signal, Stop::Fails, |pool| async move {
                event_store::MIGRATOR.run(&pool).await.context("migration failed")?;
                let reader = std::io::BufReader::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("cannot open {}", file.display()))?,
                );
                let imported =
                    transfer::import(&pool, std::io::BufRead::lines(reader)).await?;
                say(format!("imported {imported} events"))?;
                Ok(())
            })
            .await
        }
        Cmd::Verify { json } => {
            with_database(&settings, signal, Stop::Fails, |pool| async move {
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
                if json {
                    say(serde_json::json!({ "ok": true, "events": verified.events, "streams": verified.streams, "projections": checked }))?;
                } else {
                    say(format!("ok: {} events in {} streams, every hash chain intact", verified.events, verified.streams))?;
                    for p in &checked {
                        let name = p["name"].as_str().unwrap_or_default();
                        match (p.get("rows"), p["skipped"].as_str()) {
                            (Some(rows), _) => say(format!("ok: projection {name} matches the log ({rows} rows)"))?,
                            (_, Some(why)) => say(format!("skipped: projection {name}: {why}"))?,
                            _ => {}
                        }
                    }
                }
                Ok(())
            })
            .await
        }
        Cmd::Serve { only } => serve(settings, Part::parts(only), signal).await,
        Cmd::Replay { name, all } => {
            let chosen = match (name, all) {
                (_, true) => projections::all(),
                (Some(name), false) => vec![projections::by_name(&name).with_context(|| {
                    format!("no projection named {name:?}; use orders, inventory or payments")
                })?],
                (None, false) => unreachable!("clap requires a name or --all"),
            };
            with_database(&settings, signal, Stop::Fails, |pool| async move {
                event_store::MIGRATOR
                    .run(&pool)
                    .await
                    .context("migration failed")?;
                replay(&pool, chosen).await
            })
            .await
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

async fn serve(settings: Settings, parts: Parts, signal: Signal) -> anyhow::Result<()> {
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
    app.run_until(signal).await?;
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
    let printed = if json {
        let mut verdict = serde_json::json!({ "ok": false });
        if let (Some(v), Some(d)) = (verdict.as_object_mut(), detail.as_object()) {
            v.extend(d.clone());
        }
        say(verdict)
    } else {
        say(text)
    };
    match printed {
        Ok(()) => NotIntact.into(),
        Err(e) => e.into(),
    }
}

/// Prints one event as a line of text or a JSON object.
fn print_event(event: &event_store::log::LogEvent, json: bool) -> std::io::Result<()> {
    if json {
        say(serde_json::to_string(event).unwrap_or_default())
    } else {
        say(audit::line(event))
    }
}

/// What Ctrl-C or SIGTERM means for a CLI command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The way to end it (`events --follow`): exit 0.
    Succeeds,
    /// It did not finish: exit 130.
    Fails,
}

/// Opens the database (applying no migration), runs `work`, and closes it; a private cluster
/// is left as found on every way out: done, failed, interrupted (Ctrl-C, SIGTERM), or a panic
/// (the cluster's `Drop`).
async fn with_database<F, Fut>(
    settings: &Settings,
    signal: Signal,
    stop: Stop,
    work: F,
) -> anyhow::Result<()>
where
    F: FnOnce(sqlx::PgPool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (pool, local) = open_database(settings).await?;
    let result = tokio::select! {
        result = work(pool.clone()) => result,
        () = signal => match stop {
            Stop::Succeeds => Ok(()),
            Stop::Fails => Err(Interrupted.into()),
        },
    };
    pool.close().await;
    if let Some(local) = local {
        local.stop().await;
    }
    result
}

/// `serve --only notifications`: the notifications integrator until SIGTERM or Ctrl-C.
async fn notifications(settings: Settings, signal: Signal) -> anyhow::Result<()> {
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
    signal.await;
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

/// Completes on the first Ctrl-C (SIGINT) or SIGTERM after [`shutdown_signal`] was called.
type Signal = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Installs the handlers for SIGINT and SIGTERM now (a signal from here on is caught, never
/// the default exit) and answers the future that completes on the first of them.
///
/// # Errors
/// When the handlers cannot be installed.
fn shutdown_signal() -> anyhow::Result<Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
    }))
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
