//! The command line: the commands and their help ([`Cli`]), and [`run`], which hands each one to
//! its group: [`serve`] (the server and its parts), [`log`] (reading, verifying and moving
//! the log) and [`replay`] (migrations and rebuilding read models).

mod help;
mod log;
mod replay;
mod serve;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use api_common::auth::{Role, TokenKeys};
use orderline::database::{self, with_database, Stop};
use orderline::settings::Settings;

use help::{DB_HELP, ENV_HELP};
pub use serve::Part;

/// orderline: an event-sourced order engine.
///
/// Serves the HTTP API with its projections, fulfillment saga and Kafka relay (serve), applies
/// migrations (migrate), shows the log and what happened to an order or an aggregate (events,
/// audit, state), proves the log was not edited (verify), moves it between databases (export,
/// import), rebuilds read models (replay) and mints tokens (token).
#[derive(Parser)]
#[command(version, about, long_about, after_help = ENV_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

/// The commands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Apply pending migrations, then run the HTTP API, the projections, the fulfillment saga
    /// and the Kafka relay until SIGTERM or Ctrl-C.
    #[command(after_help = concat!(
        "Database: DATABASE_URL, ORDERLINE_DATA_DIR, ORDERLINE_PG_BIN, ORDERLINE_DB_POOL_SIZE\n\n",
        "Server:\n",
        "  ORDERLINE_ADDR        where the HTTP API listens [default: 127.0.0.1:8080]\n",
        "  ORDERLINE_JWT_SECRET  HS256 token secret, at least 32 bytes [default: a development secret]\n",
        "  ORDERLINE_CORS_ORIGINS  browser origins allowed to call the API, comma-separated [default: none]\n",
        "  ORDERLINE_PAYMENT_GATEWAY  simulated | stripe [default: simulated]\n",
        "  ORDERLINE_SIMULATED_GATEWAY_LATENCY_MS  added to each simulated provider answer [default: 0]\n",
        "  ORDERLINE_GATEWAY_CONCURRENCY  gateway calls in flight per process [default: 256]\n",
        "  ORDERLINE_STRIPE_BASE_URL, ORDERLINE_STRIPE_API_KEY  the Stripe-style API (with stripe)\n",
        "  ORDERLINE_AUTHORIZATION_DEADLINE_SECS  how long authorizing may take [default: 60]\n",
        "  ORDERLINE_LOG_PARTITIONS  partitions of every log consumer, a power of two [default: 16]\n",
        "  ORDERLINE_KAFKA_BROKERS  Kafka for the relay [default: unset, relay off]\n",
        "  ORDERLINE_KAFKA_TOPIC_PREFIX [default: orderline], ORDERLINE_KAFKA_PARTITIONS [default: 6]\n",
        "  ORDERLINE_KAFKA_REPLICATION_FACTOR [default: 1], ORDERLINE_KAFKA_MIN_INSYNC_REPLICAS [default: the broker's]\n",
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
        #[arg(long, value_parser = audit::filter::parse_stream)]
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
        #[arg(value_parser = audit::filter::parse_stream)]
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
pub struct NotIntact;

/// Runs one command to its end.
///
/// # Errors
/// [`NotIntact`] when `verify` found a fault, [`database::Interrupted`] on Ctrl-C or SIGTERM,
/// anything else when the command failed.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Taken before anything is started, so that a Ctrl-C or SIGTERM arriving while the private
    // cluster starts is not the default "die at once", which would leave it running.
    let signal = database::shutdown_signal()?;
    let settings = Settings::from_env().context("invalid configuration")?;
    match cli.command {
        Cmd::Token { sub, role, ttl } => {
            let keys = TokenKeys::hs256(settings.jwt_secret.expose().as_bytes());
            say(keys.mint(&sub, role, ttl)?)?;
            Ok(())
        }
        Cmd::Migrate => {
            with_database(&settings, signal, Stop::Fails, |pool| async move {
                database::migrate(&pool).await?;
                tracing::info!("migrations applied");
                Ok(())
            })
            .await
        }
        Cmd::Serve { only } => serve::serve(settings, only, signal).await,
        Cmd::Events {
            aggregate,
            correlation,
            after,
            follow,
            json,
        } => {
            let filter = audit::filter::EventFilter {
                aggregate,
                correlation,
                after,
            };
            log::events(&settings, signal, filter, follow, json).await
        }
        Cmd::Audit { id, json, .. } => log::audit(&settings, signal, id, json).await,
        Cmd::State {
            stream,
            at,
            version,
            json,
        } => log::state(&settings, signal, stream, at, version, json).await,
        Cmd::Export { since } => log::export(&settings, signal, since).await,
        Cmd::Import { file } => log::import(&settings, signal, &file).await,
        Cmd::Verify { json } => log::verify(&settings, signal, json).await,
        Cmd::Replay { name, all } => replay::replay(&settings, signal, name, all).await,
    }
}

/// Writes one line of the command's output; fails (instead of panicking, as `println!` does)
/// when the reader has gone away.
pub fn say(line: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{line}")
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
