//! The whole orderline server inside the calling process, listening on a free loopback port:
//! what end-to-end tests and the in-process bench scenarios run against.

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use api_common::auth::TokenKeys;
use orderline::{Application, Parts};
use sagas::runtime::SagaConfig;

/// A server running in this process; [`InProcess::stop`] shuts it down as SIGTERM would.
pub struct InProcess {
    /// `http://127.0.0.1:PORT`, when the API is one of its parts.
    pub address: Option<String>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

/// How to start one: the parts, the saga's settings and the CORS origins on top of defaults.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which parts run.
    pub parts: Parts,
    /// The saga's timing and concurrency; `None` keeps the server's default.
    pub saga: Option<SagaConfig>,
    /// Browser origins allowed to call the API (`https://shop.example`).
    pub cors_origins: Vec<String>,
}

impl Options {
    /// `parts` with the server's defaults otherwise.
    pub fn parts(parts: Parts) -> Self {
        Self {
            parts,
            saga: None,
            cors_origins: Vec::new(),
        }
    }
}

impl InProcess {
    /// Starts a server on `pool`'s (migrated) database verifying tokens with `keys`.
    ///
    /// # Errors
    /// When it cannot bind a port or an origin does not parse.
    pub async fn start(
        pool: &PgPool,
        keys: &TokenKeys,
        options: Options,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let mut app = Application::new(
            ([127, 0, 0, 1], 0).into(),
            pool.clone(),
            keys.clone(),
            options.parts,
        )
        .await?;
        if let Some(saga) = options.saga {
            app = app.with_saga_config(saga);
        }
        if !options.cors_origins.is_empty() {
            let origins = options
                .cors_origins
                .iter()
                .map(|o| orderline::cors_origin(o))
                .collect::<Result<Vec<_>, _>>()?;
            app = app.with_cors_origins(&origins);
        }
        let address = app.local_addr().ok().map(|a| format!("http://{a}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            stopped.await.ok();
        }));
        Ok(Self {
            address,
            stop,
            task,
        })
    }

    /// Shuts it down (requests in flight finish, consumers finish their page) and waits.
    ///
    /// # Errors
    /// What the server failed with.
    pub async fn stop(self) -> std::io::Result<()> {
        self.stop.send(()).ok();
        self.task.await.map_err(std::io::Error::other)?
    }

    /// Lets it run until the test's runtime ends, with no handle to stop it.
    pub fn detach(self) -> Option<String> {
        std::mem::forget(self.stop);
        self.address
    }
}
