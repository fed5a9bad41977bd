//! Several commands on several aggregates inside one transaction, each aggregate loaded and
//! locked once.
//!
//! Background processes (the fulfillment saga) write many commands per transaction: a page of
//! placed orders reserves stock on the same few hot SKUs again and again. The first command on an
//! aggregate loads it, takes its write lock ([`EventStore::lock_and_load`]) and keeps it;
//! later commands in the same transaction decide on the kept state and only append. That is
//! sound because the lock is held until the transaction ends: nobody else can append meanwhile.
//! A [`UnitOfWork`] must therefore live exactly as long as its transaction.

use std::any::Any;
use std::collections::HashMap;

use sqlx::PgConnection;

use crate::{EventStore, Loaded, Metadata, StoreError, StoredAggregate};

/// The aggregates one transaction has loaded and locked. Create one per transaction and drop
/// it with the transaction.
#[derive(Default)]
pub struct UnitOfWork {
    loaded: HashMap<(&'static str, String), Box<dyn Any + Send + Sync>>,
}

impl UnitOfWork {
    /// An empty unit of work, for a transaction that has just begun.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks and loads the aggregates `ids` of type `A` that this unit of work does not hold
    /// yet, all at once ([`EventStore::lock_and_load_many`]), so the commands that follow on
    /// them need no load of their own. A page of placed orders prefetches every SKU it
    /// reserves: two round trips instead of two per SKU.
    ///
    /// # Errors
    /// As [`EventStore::lock_and_load_many`]; the transaction must then be abandoned.
    pub async fn prefetch<A>(
        &mut self,
        conn: &mut PgConnection,
        ids: &[&str],
    ) -> Result<(), StoreError>
    where
        A: StoredAggregate + Send + Sync + 'static,
    {
        let mut missing: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !self.loaded.contains_key(&(A::TYPE, (*id).to_owned())))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        for (id, loaded) in EventStore::lock_and_load_many::<A>(conn, &missing).await? {
            self.loaded.insert((A::TYPE, id), Box::new(loaded));
        }
        Ok(())
    }

    /// Decides `command` on aggregate `id` and appends its events in `conn`'s transaction.
    /// Returns the events (empty when the command changed nothing) or the domain's refusal.
    ///
    /// # Errors
    /// [`StoreError`] if loading or appending fails; the transaction (and this unit of work)
    /// must then be abandoned.
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
            .decide_and_append(conn, id, command, metadata)
            .await?
            .map(|decided| decided.events);
        self.loaded.insert(key, Box::new(loaded));
        Ok(decided)
    }
}
