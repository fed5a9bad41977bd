//! Typed settings from the environment (names as in `../shared/API.md`, section Running).
//! Everything is validated at start-up so a bad value stops the process with a clear message
//! instead of failing on the first request.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The HS256 secret used when `ORDERLINE_JWT_SECRET` is unset. Development only: the server
/// warns when it uses it.
pub const DEVELOPMENT_JWT_SECRET: &str = "orderline-development-secret-do-not-use-in-production";

/// A value that must not appear in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Which Postgres to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// `DATABASE_URL`: an existing server.
    Url(Secret),
    /// `DATABASE_URL` unset: a private cluster that orderline creates and starts in this folder.
    Local(PathBuf),
}

/// All settings of `orderline serve` and `orderline migrate`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where Postgres is.
    pub database: Database,
    /// Where the HTTP API listens (`ORDERLINE_ADDR`).
    pub addr: SocketAddr,
    /// The HS256 token secret (`ORDERLINE_JWT_SECRET`).
    pub jwt_secret: Secret,
    /// Whether `jwt_secret` is the development default.
    pub jwt_secret_is_default: bool,
    /// Largest number of Postgres connections (`ORDERLINE_DB_POOL_SIZE`).
    pub pool_size: u32,
    /// The payment provider (`ORDERLINE_PAYMENT_GATEWAY`).
    pub gateway: Gateway,
    /// How much longer the simulated provider takes to answer each call
    /// (`ORDERLINE_SIMULATED_GATEWAY_LATENCY_MS`, default 0): a real provider's round trip.
    pub gateway_latency: std::time::Duration,
    /// Gateway calls in flight at once per process (`ORDERLINE_GATEWAY_CONCURRENCY`, default
    /// 256); a call holds a claim row, not a connection.
    pub gateway_concurrency: usize,
    /// How long an order's payment authorization may take, retries included, before the order
    /// is rejected with `payment_failed` (`ORDERLINE_AUTHORIZATION_DEADLINE_SECS`).
    pub authorization_deadline: std::time::Duration,
    /// The Kafka relay: `ORDERLINE_KAFKA_BROKERS` (unset: the relay is off), with
    /// `ORDERLINE_KAFKA_TOPIC_PREFIX` (default `orderline`), and for the topics it creates
    /// `ORDERLINE_KAFKA_PARTITIONS` (default 6), `ORDERLINE_KAFKA_REPLICATION_FACTOR` (default 1)
    /// and `ORDERLINE_KAFKA_MIN_INSYNC_REPLICAS` (default: the broker's).
    pub kafka: Option<kafka_relay::RelayConfig>,
    /// Where the notifications integrator sends: `ORDERLINE_NOTIFY_SMTP_HOST` (unset: to the
    /// log), `ORDERLINE_NOTIFY_SMTP_PORT` (25), `ORDERLINE_NOTIFY_FROM`,
    /// `ORDERLINE_NOTIFY_CUSTOMER_DOMAIN` and `ORDERLINE_NOTIFY_OPERATORS`.
    pub smtp: Option<integrations::notifications::SmtpConfig>,
    /// Browser origins allowed to call the API from another origin (`ORDERLINE_CORS_ORIGINS`,
    /// comma-separated, each `scheme://host[:port]`); empty (unset): no cross-origin access.
    pub cors_origins: Vec<axum::http::HeaderValue>,
    /// Partitions of the log that every consumer is split into (`ORDERLINE_LOG_PARTITIONS`, a
    /// power of two up to 256; default 16). More than the database has splits them at start-up;
    /// fewer is refused.
    pub log_partitions: u32,
}

/// The payment provider the fulfillment saga talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gateway {
    /// `simulated` (the default): the built-in provider of the documented test tokens.
    Simulated,
    /// `stripe`: a Stripe-style HTTP API at `ORDERLINE_STRIPE_BASE_URL` (default
    /// `https://api.stripe.com`) with the key `ORDERLINE_STRIPE_API_KEY` (required).
    Stripe {
        /// Base URL of the API.
        base_url: String,
        /// The secret key.
        api_key: Secret,
    },
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct SettingsError {
    name: &'static str,
    problem: String,
}

impl Settings {
    /// Reads the settings from the process environment.
    ///
    /// # Errors
    /// [`SettingsError`] naming the first variable with an unusable value.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup` (the environment, or a map in tests).
    ///
    /// # Errors
    /// [`SettingsError`] naming the first variable with an unusable value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let database = match get("DATABASE_URL") {
            Some(url) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(SettingsError {
                        name: "DATABASE_URL",
                        problem: "must start with postgres:// or postgresql://".into(),
                    });
                }
                Database::Url(Secret::new(url))
            }
            None => Database::Local(
                get("ORDERLINE_DATA_DIR")
                    .map_or_else(|| PathBuf::from(".orderline"), PathBuf::from),
            ),
        };
        let addr = match get("ORDERLINE_ADDR") {
            Some(raw) => raw.parse().map_err(|e| SettingsError {
                name: "ORDERLINE_ADDR",
                problem: format!("{e}; expected host:port such as 127.0.0.1:8080"),
            })?,
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let (jwt_secret, jwt_secret_is_default) = match get("ORDERLINE_JWT_SECRET") {
            Some(s) if s.len() < 32 => {
                return Err(SettingsError {
                    name: "ORDERLINE_JWT_SECRET",
                    problem: "must be at least 32 bytes for HS256".into(),
                })
            }
            Some(s) => (Secret::new(s), false),
            None => (Secret::new(DEVELOPMENT_JWT_SECRET), true),
        };
        let pool_size = match get("ORDERLINE_DB_POOL_SIZE") {
            Some(raw) => raw
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=500).contains(n))
                .ok_or_else(|| SettingsError {
                    name: "ORDERLINE_DB_POOL_SIZE",
                    problem: "must be a number from 1 to 500".into(),
                })?,
            None => 16,
        };
        let gateway = match get("ORDERLINE_PAYMENT_GATEWAY").as_deref() {
            None | Some("simulated") => Gateway::Simulated,
            Some("stripe") => Gateway::Stripe {
                base_url: get("ORDERLINE_STRIPE_BASE_URL")
                    .unwrap_or_else(|| "https://api.stripe.com".into()),
                api_key: Secret::new(get("ORDERLINE_STRIPE_API_KEY").ok_or_else(|| {
                    SettingsError {
                        name: "ORDERLINE_STRIPE_API_KEY",
                        problem: "is required when ORDERLINE_PAYMENT_GATEWAY=stripe".into(),
                    }
                })?),
            },
            Some(_) => {
                return Err(SettingsError {
                    name: "ORDERLINE_PAYMENT_GATEWAY",
                    problem: "must be simulated or stripe".into(),
                })
            }
        };
        let gateway_latency = match get("ORDERLINE_SIMULATED_GATEWAY_LATENCY_MS") {
            Some(raw) => raw
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= 60_000)
                .map(std::time::Duration::from_millis)
                .ok_or_else(|| SettingsError {
                    name: "ORDERLINE_SIMULATED_GATEWAY_LATENCY_MS",
                    problem: "must be a number of milliseconds from 0 to 60000".into(),
                })?,
            None => std::time::Duration::ZERO,
        };
        let gateway_concurrency = match get("ORDERLINE_GATEWAY_CONCURRENCY") {
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=10_000).contains(n))
                .ok_or_else(|| SettingsError {
                    name: "ORDERLINE_GATEWAY_CONCURRENCY",
                    problem: "must be a number from 1 to 10000".into(),
                })?,
            None => 256,
        };
        let authorization_deadline = match get("ORDERLINE_AUTHORIZATION_DEADLINE_SECS") {
            Some(raw) => raw
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=86_400).contains(n))
                .map(std::time::Duration::from_secs)
                .ok_or_else(|| SettingsError {
                    name: "ORDERLINE_AUTHORIZATION_DEADLINE_SECS",
                    problem: "must be a number of seconds from 1 to 86400".into(),
                })?,
            None => std::time::Duration::from_secs(60),
        };
        let kafka = match get("ORDERLINE_KAFKA_BROKERS") {
            None => None,
            Some(brokers) => {
                let mut relay = kafka_relay::RelayConfig::new(brokers);
                if let Some(prefix) = get("ORDERLINE_KAFKA_TOPIC_PREFIX") {
                    if !prefix
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                    {
                        return Err(SettingsError {
                            name: "ORDERLINE_KAFKA_TOPIC_PREFIX",
                            problem: "may hold only letters, digits, '.', '_' and '-'".into(),
                        });
                    }
                    relay.topic_prefix = prefix;
                }
                if let Some(raw) = get("ORDERLINE_KAFKA_PARTITIONS") {
                    relay.partitions = raw
                        .parse::<i32>()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| SettingsError {
                        name: "ORDERLINE_KAFKA_PARTITIONS",
                        problem: "must be a number from 1 to 1000".into(),
                    })?;
                }
                if let Some(raw) = get("ORDERLINE_KAFKA_REPLICATION_FACTOR") {
                    relay.replication = raw
                        .parse::<i32>()
                        .ok()
                        .filter(|n| (1..=32).contains(n))
                        .ok_or_else(|| SettingsError {
                            name: "ORDERLINE_KAFKA_REPLICATION_FACTOR",
                            problem: "must be a number from 1 to 32".into(),
                        })?;
                }
                if let Some(raw) = get("ORDERLINE_KAFKA_MIN_INSYNC_REPLICAS") {
                    let min = raw
                        .parse::<i32>()
                        .ok()
                        .filter(|n| (1..=relay.replication).contains(n))
                        .ok_or_else(|| SettingsError {
                            name: "ORDERLINE_KAFKA_MIN_INSYNC_REPLICAS",
                            problem: format!(
                                "must be a number from 1 to the replication factor ({})",
                                relay.replication
                            ),
                        })?;
                    relay.min_insync_replicas = Some(min);
                }
                Some(relay)
            }
        };
        let smtp = match get("ORDERLINE_NOTIFY_SMTP_HOST") {
            None => None,
            Some(host) => Some(integrations::notifications::SmtpConfig {
                host,
                port: match get("ORDERLINE_NOTIFY_SMTP_PORT") {
                    Some(raw) => raw.parse().map_err(|_| SettingsError {
                        name: "ORDERLINE_NOTIFY_SMTP_PORT",
                        problem: "must be a port number".into(),
                    })?,
                    None => 25,
                },
                from: get("ORDERLINE_NOTIFY_FROM").unwrap_or_else(|| "orderline@localhost".into()),
                customer_domain: get("ORDERLINE_NOTIFY_CUSTOMER_DOMAIN")
                    .unwrap_or_else(|| "customers.invalid".into()),
                operators: get("ORDERLINE_NOTIFY_OPERATORS")
                    .unwrap_or_else(|| "operators@localhost".into()),
            }),
        };
        let cors_origins = match get("ORDERLINE_CORS_ORIGINS") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(|origin| {
                    crate::cors_origin(origin).map_err(|problem| SettingsError {
                        name: "ORDERLINE_CORS_ORIGINS",
                        problem,
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let log_partitions = match get("ORDERLINE_LOG_PARTITIONS") {
            Some(raw) => raw
                .parse::<u32>()
                .ok()
                .filter(|n| event_log::partitions::valid(*n))
                .ok_or_else(|| SettingsError {
                    name: "ORDERLINE_LOG_PARTITIONS",
                    problem: "must be a power of two from 1 to 256".into(),
                })?,
            None => event_log::partitions::DEFAULT_PARTITIONS,
        };
        Ok(Self {
            log_partitions,
            database,
            addr,
            jwt_secret,
            jwt_secret_is_default,
            pool_size,
            gateway,
            gateway_latency,
            gateway_concurrency,
            authorization_deadline,
            kafka,
            smtp,
            cors_origins,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_need_no_environment() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.database, Database::Local(PathBuf::from(".orderline")));
        assert_eq!(s.addr, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert!(s.jwt_secret_is_default);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let e = settings(&[("ORDERLINE_ADDR", "nope")]).unwrap_err();
        assert!(e.to_string().starts_with("ORDERLINE_ADDR"));
        let e = settings(&[("ORDERLINE_JWT_SECRET", "short")]).unwrap_err();
        assert!(e.to_string().starts_with("ORDERLINE_JWT_SECRET"));
        let e = settings(&[("DATABASE_URL", "mysql://x")]).unwrap_err();
        assert!(e.to_string().starts_with("DATABASE_URL"));
    }

    #[test]
    fn kafka_replication_settings_reach_the_relay_and_are_checked_together() {
        let brokers = ("ORDERLINE_KAFKA_BROKERS", "127.0.0.1:9092");
        let relay = settings(&[brokers]).unwrap().kafka.unwrap();
        assert_eq!((relay.replication, relay.min_insync_replicas), (1, None));
        let relay = settings(&[
            brokers,
            ("ORDERLINE_KAFKA_REPLICATION_FACTOR", "3"),
            ("ORDERLINE_KAFKA_MIN_INSYNC_REPLICAS", "2"),
        ])
        .unwrap()
        .kafka
        .unwrap();
        assert_eq!((relay.replication, relay.min_insync_replicas), (3, Some(2)));
        // More in-sync replicas than replicas would refuse every write with acks=all.
        let e = settings(&[brokers, ("ORDERLINE_KAFKA_MIN_INSYNC_REPLICAS", "2")]).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("ORDERLINE_KAFKA_MIN_INSYNC_REPLICAS"));
        let e = settings(&[brokers, ("ORDERLINE_KAFKA_REPLICATION_FACTOR", "0")]).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("ORDERLINE_KAFKA_REPLICATION_FACTOR"));
    }

    #[test]
    fn cors_origins_are_a_checked_list() {
        assert!(settings(&[]).unwrap().cors_origins.is_empty());
        let s = settings(&[(
            "ORDERLINE_CORS_ORIGINS",
            "https://shop.example, http://localhost:3000",
        )])
        .unwrap();
        assert_eq!(
            s.cors_origins,
            ["https://shop.example", "http://localhost:3000"]
        );
        for bad in ["*", "shop.example", "https://shop.example/path"] {
            let e = settings(&[("ORDERLINE_CORS_ORIGINS", bad)]).unwrap_err();
            assert!(e.to_string().starts_with("ORDERLINE_CORS_ORIGINS"), "{bad}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = settings(&[("DATABASE_URL", "postgres://u:pw@h/db")]).unwrap();
        assert!(!format!("{s:?}").contains("pw"));
    }
}
