//! The `orderline` server: wires the crates into one HTTP application.
//!
//! [`app`] builds the router (command, query and admin routes, health, problem+json fallbacks)
//! and [`Application`] runs the parts of the server under one lifecycle: the HTTP API on a
//! port, the projections following the log, the fulfillment saga (its log consumer and its
//! gateway worker), the Kafka relay and, when asked for, the notifications integrator. The binary (`main.rs`, `cli/`) adds the commands; [`database`] is the one
//! open/migrate/close path, over [`settings`] and the private cluster ([`local_postgres`]). Tests use [`Application`] on port 0.

pub mod database;
pub mod local_postgres;
pub mod settings;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;

use admin_api::AdminState;
use api_common::auth::TokenKeys;
use api_common::error::ApiError;
use api_common::ids;
use command_api::CommandState;
use event_log::subscription::{Consumer, RunnerConfig, Subscriptions};
use event_store::EventStore;
use integrations::inbox::{InboxConfig, InboxConsumer};
use integrations::notifications::{
    LogNotifier, NotificationsHandler, Notifier, Sender, SenderConfig,
};
use kafka_relay::{KafkaRelay, RelayConfig};
use query_api::live::{LiveHandle, LiveUpdates};
use query_api::QueryState;
use sagas::gateway::simulated::SimulatedGateway;
use sagas::gateway::PaymentGateway;
use sagas::runtime::{FulfillmentConsumer, GatewayWorker, SagaConfig};

/// Headers every answer carries unless its handler set them: answers hold a caller's own data
/// and must not be kept by shared caches or the browser (`no-store`), nor sniffed into
/// another content type.
fn protective_headers(router: Router) -> Router {
    use axum::http::{header, HeaderValue};
    use tower_http::set_header::SetResponseHeaderLayer;
    router
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
}

/// Checks one allowed CORS origin: `scheme://host[:port]` with no path, as browsers send it in
/// `Origin`.
///
/// # Errors
/// What is wrong with it.
pub fn cors_origin(origin: &str) -> Result<axum::http::HeaderValue, String> {
    let uri: axum::http::Uri = origin
        .parse()
        .map_err(|_| format!("{origin:?} is not an origin such as https://shop.example"))?;
    let bare = uri.scheme().is_some()
        && uri.authority().is_some()
        && uri.path_and_query().is_none_or(|p| p.as_str() == "/")
        && !origin.ends_with('/');
    if !bare {
        return Err(format!(
            "{origin:?} is not an origin such as https://shop.example (scheme and host, no path)"
        ));
    }
    axum::http::HeaderValue::from_str(origin).map_err(|e| e.to_string())
}

/// The CORS policy for browser front-ends on `origins`: their preflights are answered, they may
/// send the token, the idempotency key and the request ids, and read the position, request-id,
/// rate-limit and `Location`/`Retry-After` headers. Credentials (cookies) are not used by the
/// API and are not allowed.
fn cors(origins: &[axum::http::HeaderValue]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderName, Method};
    let name = HeaderName::from_static;
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins.to_vec())
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            name("idempotency-key"),
            name("x-request-id"),
            name("x-correlation-id"),
        ])
        .expose_headers([
            query_api::POSITION_HEADER.clone(),
            name("x-request-id"),
            name("x-correlation-id"),
            name("x-ratelimit-limit"),
            name("x-ratelimit-remaining"),
            name("x-ratelimit-reset"),
            header::LOCATION,
            header::RETRY_AFTER,
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// What `/health/ready` needs: the database, and the name this process's log consumers hold
/// their leases under.
#[derive(Clone)]
struct Health {
    pool: PgPool,
    process: Arc<str>,
}

/// The whole HTTP API over one database; its long-lived streams wait on `live`. `process` is
/// the name this process's consumers hold leases under, shown by `/health/ready`.
pub fn app(pool: PgPool, keys: TokenKeys, updates: LiveUpdates, process: &str) -> Router {
    let commands = command_api::router(CommandState {
        store: EventStore::new(pool.clone()),
        keys: keys.clone(),
        locks: Default::default(),
    });
    let admin = admin_api::router(AdminState {
        pool: pool.clone(),
        keys: keys.clone(),
    });
    let queries = query_api::router(QueryState {
        pool: pool.clone(),
        keys,
        live: updates,
        waiters: std::sync::Arc::new(tokio::sync::Semaphore::new(query_api::MAX_WAITERS)),
    });
    let router = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(Health {
            pool,
            process: process.into(),
        })
        .merge(commands)
        .merge(queries)
        .merge(admin)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(ids::assign_ids));
    protective_headers(router)
}

/// `GET /health/live`: the process is up.
async fn live() -> impl IntoResponse {
    Json(json!({ "status": "up" }))
}

/// `GET /health/ready`: the database answers and every migration is applied; `process` names
/// this process as the owners of consumer partitions do (`GET /api/v1/admin/projections`).
/// Anyone may ask, so the driver's error (host names, user names) goes to the log, not into
/// the answer.
async fn ready(State(health): State<Health>) -> Result<impl IntoResponse, ApiError> {
    match event_store::migrations_applied(&health.pool).await {
        Ok(true) => Ok((
            StatusCode::OK,
            Json(json!({ "status": "ready", "process": &*health.process })),
        )),
        Ok(false) => Err(ApiError::Unavailable("migrations are pending".into())),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: the database is unreachable");
            Err(ApiError::Unavailable("the database is unreachable".into()))
        }
    }
}

/// Which parts of the server a process runs. Several processes may share one database: each
/// projection is applied by exactly one of them at a time (see `event_log::subscription`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// Serve the HTTP API.
    pub api: bool,
    /// Follow the log with the projections.
    pub projections: bool,
    /// Run the fulfillment saga: its log consumer and its gateway worker.
    pub sagas: bool,
    /// Run the Kafka relay (when Kafka is configured).
    pub relay: bool,
    /// Run the notifications integrator: read the Kafka topics and send e-mail (or log) about
    /// orders and low stock. Needs Kafka; not part of [`Parts::ALL`], it runs only when asked
    /// for (an integrator, like any other consumer of the topics).
    pub notifications: bool,
}

impl Parts {
    /// Every part: what `orderline serve` runs by default.
    pub const ALL: Self = Self {
        api: true,
        projections: true,
        sagas: true,
        relay: true,
        notifications: false,
    };

    /// Nothing; switch on what you need.
    pub const NONE: Self = Self {
        api: false,
        projections: false,
        sagas: false,
        relay: false,
        notifications: false,
    };
}

/// The server's parts, ready to run.
pub struct Application {
    listener: Option<tokio::net::TcpListener>,
    router: Router,
    /// Ends the API's long-lived streams at shutdown, so they do not hold it up.
    live: Option<LiveHandle>,
    pool: PgPool,
    parts: Parts,
    runner: RunnerConfig,
    gateway: Arc<dyn PaymentGateway>,
    saga: SagaConfig,
    kafka: Option<RelayConfig>,
    notifier: Option<Arc<dyn Notifier>>,
}

impl Application {
    /// Prepares the given parts; binds `addr` only if the API is one of them.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn new(
        addr: SocketAddr,
        pool: PgPool,
        keys: TokenKeys,
        parts: Parts,
    ) -> std::io::Result<Self> {
        let listener = match parts.api {
            true => Some(tokio::net::TcpListener::bind(addr).await?),
            false => None,
        };
        let runner = RunnerConfig::default();
        let (router, live) = match parts.api {
            true => {
                let (updates, handle) = LiveUpdates::spawn(pool.clone());
                (
                    app(pool.clone(), keys, updates, &runner.owner),
                    Some(handle),
                )
            }
            false => (Router::new(), None),
        };
        Ok(Self {
            listener,
            router,
            live,
            gateway: Arc::new(SimulatedGateway::new(pool.clone())),
            pool,
            parts,
            runner,
            saga: SagaConfig::default(),
            kafka: None,
            notifier: None,
        })
    }

    /// Uses `gateway` as the payment provider instead of the simulated one.
    #[must_use]
    pub fn with_gateway(mut self, gateway: Arc<dyn PaymentGateway>) -> Self {
        self.gateway = gateway;
        self
    }

    /// Splits every log consumer into `partitions` partitions (a power of two; the database's
    /// count is raised to it at start if lower, see `event_log::partitions::ensure`).
    #[must_use]
    pub fn with_log_partitions(mut self, partitions: u32) -> Self {
        self.runner.partitions = partitions;
        self
    }

    /// Uses `config` for the fulfillment saga instead of the defaults.
    #[must_use]
    pub fn with_saga_config(mut self, config: SagaConfig) -> Self {
        self.saga = config;
        self
    }

    /// Lets browser front-ends on `origins` (checked by [`cors_origin`]) call the API; none:
    /// no cross-origin access, and a preflight is refused.
    #[must_use]
    pub fn with_cors_origins(mut self, origins: &[axum::http::HeaderValue]) -> Self {
        if !origins.is_empty() {
            self.router = self.router.layer(cors(origins));
        }
        self
    }

    /// Publishes the log to Kafka with `config` (when this process runs the relay part).
    #[must_use]
    pub fn with_kafka(mut self, config: Option<RelayConfig>) -> Self {
        self.kafka = config;
        self
    }

    /// Sends notifications through `notifier` (when this process runs the notifications part);
    /// without one they go to the log.
    #[must_use]
    pub fn with_notifier(mut self, notifier: Arc<dyn Notifier>) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// Starts the notifications integrator: its inbox on the order and inventory topics and
    /// its sender.
    ///
    /// # Errors
    /// When Kafka is not configured or the consumer cannot join its group.
    fn start_notifications(&self) -> std::io::Result<(InboxConsumer, Sender)> {
        let kafka = self.kafka.as_ref().ok_or_else(|| {
            std::io::Error::other("the notifications part needs ORDERLINE_KAFKA_BROKERS")
        })?;
        let topics = vec![kafka.topic("order"), kafka.topic("inventory")];
        let inbox = InboxConsumer::spawn(
            self.pool.clone(),
            &InboxConfig::new(kafka.brokers.clone(), topics),
            Arc::new(NotificationsHandler),
        )
        .map_err(|e| std::io::Error::other(format!("cannot join the Kafka consumer group: {e}")))?;
        let notifier = self
            .notifier
            .clone()
            .unwrap_or_else(|| Arc::new(LogNotifier) as Arc<dyn Notifier>);
        let sender = Sender::spawn(self.pool.clone(), notifier, SenderConfig::default());
        Ok((inbox, sender))
    }

    /// The address the API is bound to.
    ///
    /// # Errors
    /// When this process does not run the API.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(listener) => listener.local_addr(),
            None => Err(std::io::Error::other("this process does not serve the API")),
        }
    }

    /// Runs until `shutdown` completes. The API then stops accepting and lets in-flight
    /// requests finish (a command that was answered has committed); the projections finish
    /// their current page, the notifications integrator its message.
    ///
    /// # Errors
    /// When the listener fails, or the notifications part cannot start.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let notifications = match self.parts.notifications {
            true => Some(self.start_notifications()?),
            false => None,
        };
        let store = EventStore::new(self.pool.clone());
        let mut consumers = Vec::new();
        if self.parts.projections {
            consumers.extend(projections::consumers());
        }
        if self.parts.sagas {
            consumers
                .push(Arc::new(FulfillmentConsumer::new(self.saga.timing)) as Arc<dyn Consumer>);
        }
        if self.parts.relay {
            match &self.kafka {
                Some(config) => match KafkaRelay::new(config.clone()) {
                    Ok(relay) => consumers.push(Arc::new(relay) as Arc<dyn Consumer>),
                    Err(e) => tracing::error!(error = %e, "the Kafka relay cannot start"),
                },
                None => tracing::info!("ORDERLINE_KAFKA_BROKERS is unset: the Kafka relay is off"),
            }
        }
        let mut runner = self.runner.clone();
        if !consumers.is_empty() {
            runner.partitions = event_log::partitions::ensure(&self.pool, runner.partitions)
                .await
                .map_err(|e| std::io::Error::other(format!("log partitions: {e}")))?;
        }
        let subscriptions =
            (!consumers.is_empty()).then(|| Subscriptions::spawn(&self.pool, consumers, &runner));
        let worker = self.parts.sagas.then(|| {
            GatewayWorker::spawn(
                store,
                self.gateway.clone(),
                self.saga.clone(),
                runner.owner.clone(),
            )
        });
        let live = self.live;
        let served = match self.listener {
            Some(listener) => {
                // Streams end first (each says goodbye); then in-flight requests finish.
                let closing = async move {
                    shutdown.await;
                    if let Some(live) = live {
                        live.close().await;
                    }
                };
                axum::serve(listener, self.router)
                    .with_graceful_shutdown(closing)
                    .await
            }
            None => {
                shutdown.await;
                Ok(())
            }
        };
        if let Some(worker) = worker {
            worker.shutdown().await;
        }
        if let Some(subscriptions) = subscriptions {
            subscriptions.shutdown().await;
        }
        if let Some((inbox, sender)) = notifications {
            inbox.stop().await;
            sender.stop().await;
        }
        served
    }
}
