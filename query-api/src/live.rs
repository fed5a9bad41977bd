//! Live updates for long-lived answers (Server-Sent Events): one Postgres listener per process
//! fans the checkpoint notifications out to every open stream in memory, so an idle stream
//! costs no query at all, and a shutdown ends every stream at once.
//!
//! The listener follows [`CHECKPOINT_CHANNEL`], which the subscription runner notifies in the
//! transaction that moves a read model's checkpoint: a stream woken by it re-reads its row and
//! finds the change (the events' own NOTIFY would come before the read model has them). When
//! the listener's connection breaks, every stream is woken once it is back, so nothing that
//! happened meanwhile is missed.

use sqlx::PgPool;
use tokio::sync::watch;

use event_log::checkpoints::CHECKPOINT_CHANNEL;
use event_log::subscription::forward_notifications;

/// What streams wait on: how often each read model has moved, and whether the server closes.
#[derive(Clone)]
pub struct LiveUpdates {
    /// Bumped whenever the `orders` read model moved (or may have, after a reconnect).
    orders: watch::Receiver<u64>,
    /// `true` once the server is shutting down.
    closing: watch::Receiver<bool>,
}

/// Owns the listener task; [`LiveHandle::close`] ends every stream and the task.
pub struct LiveHandle {
    closing: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Why a stream stops waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The read model moved: read again.
    Moved,
    /// The server is shutting down: say goodbye and end.
    Closing,
}

impl LiveUpdates {
    /// Starts the process's one listener on `pool`'s database.
    pub fn spawn(pool: PgPool) -> (Self, LiveHandle) {
        let (orders_tx, orders) = watch::channel(0u64);
        let (closing_tx, closing) = watch::channel(false);
        let task = tokio::spawn(listen(pool, orders_tx, closing.clone()));
        (
            Self { orders, closing },
            LiveHandle {
                closing: closing_tx,
                task: Some(task),
            },
        )
    }

    /// A subscription for one stream, taken before it first reads, so that no move between its
    /// read and its wait is missed.
    pub fn subscribe(&self) -> Subscription {
        let mut orders = self.orders.clone();
        orders.mark_unchanged();
        Subscription {
            orders,
            closing: self.closing.clone(),
        }
    }
}

/// One stream's view of [`LiveUpdates`].
pub struct Subscription {
    orders: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
}

impl Subscription {
    /// Whether the server is shutting down.
    pub fn closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Waits until the `orders` read model moves or the server closes.
    pub async fn next(&mut self) -> Wake {
        if self.closing() {
            return Wake::Closing;
        }
        tokio::select! {
            moved = self.orders.changed() => match moved {
                Ok(()) => Wake::Moved,
                Err(_) => Wake::Closing,
            },
            _ = self.closing.changed() => Wake::Closing,
        }
    }
}

impl LiveHandle {
    /// Ends every stream (each sends its goodbye and closes) and stops the listener.
    pub async fn close(mut self) {
        self.closing.send_replace(true);
        if let Some(task) = self.task.take() {
            task.await.ok();
        }
    }
}

impl Drop for LiveHandle {
    fn drop(&mut self) {
        self.closing.send_replace(true);
    }
}

async fn listen(pool: PgPool, orders: watch::Sender<u64>, closing: watch::Receiver<bool>) {
    forward_notifications(&pool, CHECKPOINT_CHANNEL, closing, |payload| {
        // `None` is a (re)connect: whatever moved while no listener was there is found by
        // reading again.
        if payload.is_none_or(|consumer| consumer == "orders") {
            orders.send_modify(|n| *n = n.wrapping_add(1));
        }
    })
    .await;
}
