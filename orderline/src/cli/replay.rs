//! `orderline replay`: rebuilding read models from the log with a progress bar.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use orderline::database::{self, with_database, Signal, Stop};
use orderline::settings::Settings;
use projections::rebuild::{self, RebuildLock};

/// Migrates, then rebuilds projection `name` (or every one, with `all`) in turn.
pub async fn replay(
    settings: &Settings,
    signal: Signal,
    name: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    let chosen = match (name, all) {
        (_, true) => projections::all(),
        (Some(name), false) => vec![projections::by_name(&name).with_context(|| {
            format!("no projection named {name:?}; use orders, inventory or payments")
        })?],
        (None, false) => anyhow::bail!("name a projection or pass --all"),
    };
    with_database(settings, signal, Stop::Fails, |pool| async move {
        database::migrate(&pool).await?;
        rebuild_each(&pool, chosen).await
    })
    .await
}

/// Rebuilds each projection in turn with a progress bar.
async fn rebuild_each(
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
