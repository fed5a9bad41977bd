//! `orderline serve`: the server with all its parts, or one part alone (`--only`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;

use api_common::auth::TokenKeys;
use integrations::notifications::{LogNotifier, Notifier, SmtpNotifier};
use orderline::database::{self, Opened, Signal};
use orderline::settings::{Gateway, Settings};
use orderline::{Application, Parts};
use sagas::fulfillment::Timing;
use sagas::gateway::simulated::SimulatedGateway;
use sagas::gateway::stripe::{StripeConfig, StripeGateway};
use sagas::gateway::PaymentGateway;
use sagas::runtime::SagaConfig;

/// Parts of the server that can run alone.
#[derive(Clone, Copy, ValueEnum)]
pub enum Part {
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
            Some(Part::Notifications) => Parts {
                notifications: true,
                ..Parts::NONE
            },
        }
    }
}

/// `orderline serve [--only PART]`: migrates, then runs the chosen parts until `signal`.
pub async fn serve(settings: Settings, only: Option<Part>, signal: Signal) -> anyhow::Result<()> {
    let parts = Part::parts(only);
    if parts.notifications && settings.kafka.is_none() {
        anyhow::bail!("--only notifications needs ORDERLINE_KAFKA_BROKERS");
    }
    if settings.jwt_secret_is_default {
        tracing::warn!("ORDERLINE_JWT_SECRET is unset: using the development secret; never do this in production");
    }
    let opened = Opened::open(&settings).await?;
    let pool = opened.pool.clone();
    database::migrate(&pool).await?;
    let keys = TokenKeys::hs256(settings.jwt_secret.expose().as_bytes());
    let gateway: Arc<dyn PaymentGateway> = match &settings.gateway {
        Gateway::Simulated => {
            Arc::new(SimulatedGateway::new(pool.clone()).with_latency(settings.gateway_latency))
        }
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
        concurrency: settings.gateway_concurrency,
        ..SagaConfig::default()
    };
    let mut app = Application::new(settings.addr, pool.clone(), keys, parts)
        .await
        .with_context(|| format!("cannot listen on {}", settings.addr))?
        .with_gateway(gateway)
        .with_saga_config(saga)
        .with_kafka(settings.kafka.clone())
        .with_log_partitions(settings.log_partitions)
        .with_cors_origins(&settings.cors_origins);
    if parts.notifications {
        app = app.with_notifier(notifier(&settings));
    }
    if let Ok(addr) = app.local_addr() {
        tracing::info!(%addr, "orderline is listening");
    }
    if parts.projections {
        tracing::info!("projections are following the log");
    }
    if parts.sagas {
        tracing::info!(gateway = ?settings.gateway, "the fulfillment saga is running");
    }
    if parts.notifications {
        tracing::info!("the notifications integrator is running");
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
    opened.close().await;
    Ok(())
}

/// The notifier of the notifications part: SMTP when a host is set, else the log.
fn notifier(settings: &Settings) -> Arc<dyn Notifier> {
    match settings.smtp.clone() {
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
    }
}
