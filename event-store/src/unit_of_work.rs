//! Several commands on several aggregates inside one transaction, each aggregate loaded and
//! locked once, their events written together.
//!
//! Background processes (the fulfillment saga) write many commands per transaction: a page of
//! placed orders reserves stock on the same few hot SKUs again and again. The first command on an
//! aggregate loads it, takes its write lock ([`EventStore::lock_and_load`]) and keeps it;
//! later commands in the same transaction decide on the kept state. Their events are staged, not
//! written: [`UnitOfWork::flush`] writes every staged event of the transaction in one statement
//! ([`Batch::write`]). That is sound because the locks are held until the transaction ends:
//! nobody else can append meanwhile, and nothing is visible before the commit anyway. A
//! [`UnitOfWork`] must therefore live exactly as long as its transaction, and be flushed before
//! the commit.

use std::any::Any;
use std::collections::HashMap;

use sqlx::PgConnection;

use crate::store::{Batch, LoadMany};
use crate::{EventStore, Loaded, Metadata, StoreError, StoredAggregate};

/// The aggregates one transaction has loaded and locked, and the events it decided that wait to
/// be written. Create one per transaction, [`UnitOfWork::flush`] it before the commit, and drop
/// it with the transaction.
#[derive(Default)]
pub struct UnitOfWork {
    loaded: HashMap<(&'static str, String), Box<dyn Any + Send + Sync>>,
    staged: Batch,
}

impl UnitOfWork {
    /// An empty unit of work, for a transaction that has just begun.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks and loads, all at once ([`LoadMany::lock_and_load`]: two round trips whatever the
    /// number of aggregates and types), the aggregates of `wanted` that this unit of work does
    /// not hold yet, so the commands that follow on them need no load of their own. A page of
    /// placed orders prefetches every SKU, payment and order it may command.
    ///
    /// # Errors
    /// As [`LoadMany::lock_and_load`]; the transaction must then be abandoned.
    pub async fn prefetch(
        &mut self,
        conn: &mut PgConnection,
        wanted: &LoadMany,
    ) -> Result<(), StoreError> {
        let missing = wanted.without(|t, id| self.loaded.contains_key(&(t, id.to_owned())));
        for (aggregate_type, id, loaded) in missing.lock_and_load(conn).await? {
            self.loaded.insert((aggregate_type, id), loaded);
        }
        Ok(())
    }

    /// Decides `command` on aggregate `id` (loading and locking it first unless held) and
    /// stages its events, to be written by [`UnitOfWork::flush`]. Returns the events (empty
    /// when the command changed nothing) or the domain's refusal.
    ///
    /// # Errors
    /// [`StoreError`] if loading fails or an event does not serialize; the transaction (and
    /// this unit of work) must then be abandoned.
    pub async fn execute<A>(
        &mut self,
        conn: &mut PgConnection,
        id: &str,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Result<Vec<A::Event>, A::Error>, StoreError>
    where
        A: StoredAggregate<Services = ()> + Send + Sync + 'static,
    {
        let key = (A::TYPE, id.to_owned());
        let kept = self
            .loaded
            .remove(&key)
            .and_then(|held| held.downcast::<Loaded<A>>().ok());
        let mut loaded = match kept {
            Some(loaded) => *loaded,
            None => EventStore::lock_and_load::<A>(conn, id).await?,
        };
        let decided = loaded
            .decide_into(&mut self.staged, id, command, metadata)
            .await;
        self.loaded.insert(key, Box::new(loaded));
        decided
    }

    /// Writes every event staged since the last flush, in one statement (and the snapshots due
    /// in one more), in `conn`'s transaction. Call it before the commit; events not flushed are
    /// lost with the unit of work.
    ///
    /// # Errors
    /// As [`Batch::write`]; the transaction must then be abandoned.
    pub async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), StoreError> {
        self.staged.write(conn).await.map(drop)
    }
}
