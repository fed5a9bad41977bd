//! Pages of several partitions of one consumer applied in one transaction.
//!
//! Each of a consumer's partitions has its own worker, checkpoint and lease, and a page of one
//! partition costs the same five or six statements (read, begin, apply, checkpoint, commit)
//! whether it holds one event or fifty. Under load, one commit wakes several partitions of the
//! same consumer at once; their workers hand their next page to the consumer's [`Group`], which
//! reads all of them in one statement, applies them in one transaction and moves every
//! checkpoint in one more, each still checked against its own cursor, lease and parked keys.
//!
//! The group is group commit: a worker queues its partition and waits for one of the group's
//! [`IN_FLIGHT`] permits; whoever gets one applies everything queued by then, its own request
//! included, while the next requests queue behind it. A worker whose request another one took
//! along waits for its answer without a permit. Under light load each page goes alone, as it
//! would without the group; under load, pages queue while the transactions in flight run and
//! go together. A group that cannot commit as a whole (a page fails, a
//! checkpoint moved, a lease was taken over) commits nothing, and each of its workers takes
//! its next page alone, where the failure is narrowed down, parked or fenced as ever: the group
//! is only the fast path of pages that go through.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{oneshot, Semaphore};
use tracing::Instrument;

use super::{begin_page, page_size, Consumer, Freeze, RunnerConfig};
use crate::checkpoints::{self, Advance, Lease};
use crate::{crash, reader, Cursor, LogEvent};

/// A partition's next page, as its worker asks for it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    /// The partition and the lease its worker holds.
    pub lease: Lease,
    /// The partition's checkpoint, as its worker last knew it.
    pub cursor: Cursor,
    /// The version of the partition's parked keys (it has none) its worker last read.
    pub parked_version: i64,
}

/// What became of a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The partition's page was applied and its checkpoint moved here.
    Applied(Cursor),
    /// Nothing of the partition was readable: look at its tail alone (held back, or passed).
    Empty,
    /// The group committed nothing: take the next page alone.
    Alone,
}

/// Group transactions of one consumer in flight at once in a process: enough that a page
/// waiting for a lock or a commit does not hold back the others, few enough that pages queue
/// and go together under load.
pub(super) const IN_FLIGHT: usize = 2;

struct Pending {
    request: Request,
    answer: oneshot::Sender<Outcome>,
}

/// One consumer's group in this process, shared by its workers.
pub(super) struct Group {
    pool: PgPool,
    consumer: Arc<dyn Consumer>,
    config: RunnerConfig,
    partitions: u32,
    freeze: Arc<Freeze>,
    queue: std::sync::Mutex<Vec<Pending>>,
    /// Held by each worker applying a group ([`IN_FLIGHT`] at most); the others queue.
    permits: Semaphore,
}

impl Group {
    pub(super) fn new(
        pool: PgPool,
        consumer: Arc<dyn Consumer>,
        config: RunnerConfig,
        partitions: u32,
        freeze: Arc<Freeze>,
    ) -> Self {
        Self {
            pool,
            consumer,
            config,
            partitions,
            freeze,
            queue: std::sync::Mutex::new(Vec::new()),
            permits: Semaphore::new(IN_FLIGHT),
        }
    }

    /// Most events in one group's transaction: the consumer's page size, shared by the
    /// partitions in the group.
    fn budget(&self) -> i64 {
        page_size(&*self.consumer, &self.config)
    }

    /// Applies `request`'s next page, with those of any other partitions queued meanwhile.
    pub(super) async fn page(&self, request: Request) -> Outcome {
        let (answer, mut answered) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Pending { request, answer });
        let Ok(permit) = self.permits.acquire().await else {
            return Outcome::Alone;
        };
        // A group that started meanwhile may have taken our request along (it may still be
        // running: then the queue holds nothing of ours).
        if let Ok(outcome) = answered.try_recv() {
            return outcome;
        }
        let queued = std::mem::take(
            &mut *self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if !queued.is_empty() {
            self.apply(queued).await;
        }
        drop(permit);
        // A leader whose task was aborted mid-group dropped the answers, before or after its
        // commit: alone, the worker finds out which (its checkpoint moved, or not).
        answered.await.unwrap_or(Outcome::Alone)
    }

    /// Reads, applies and checkpoints the pages of `queued` together, and answers each.
    async fn apply(&self, queued: Vec<Pending>) {
        // One request per partition: a worker stopping after a lost lease and the next one for
        // the same partition may both ask for a moment.
        let mut seen = HashSet::new();
        let mut pending = Vec::with_capacity(queued.len());
        for p in queued {
            if seen.insert(p.request.lease.partition) {
                pending.push(p);
            } else {
                let _ = p.answer.send(Outcome::Alone);
            }
        }
        let requests: Vec<Request> = pending.iter().map(|p| p.request).collect();
        let outcomes = match self.run(&requests).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                // The workers' pages alone will meet the error again and report it.
                tracing::debug!(consumer = self.consumer.name(), %error, "a group page did not commit");
                vec![Outcome::Alone; requests.len()]
            }
        };
        for (p, outcome) in pending.into_iter().zip(outcomes) {
            let _ = p.answer.send(outcome);
        }
    }

    async fn run(&self, requests: &[Request]) -> Result<Vec<Outcome>, String> {
        let name = self.consumer.name();
        let count = i64::try_from(requests.len()).unwrap_or(i64::MAX);
        let limit = (self.budget() / count.max(1)).max(1);
        let after: Vec<(u32, Cursor)> = requests
            .iter()
            .map(|r| (r.lease.partition, r.cursor))
            .collect();
        let mut events = {
            let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
            reader::read_partitions(&mut conn, self.partitions, &after, limit)
                .await
                .map_err(|e| e.to_string())?
        };
        let mut outcomes = vec![Outcome::Empty; requests.len()];
        let mut advances = Vec::new();
        for (i, request) in requests.iter().enumerate() {
            // The statement answers each partition's events together, in log order.
            let (applied, last) = events
                .iter()
                .filter(|e| e.partition(self.partitions) == request.lease.partition)
                .fold((0, None), |(n, _), e| (n + 1, Some(e.cursor())));
            if let Some(next) = last {
                outcomes[i] = Outcome::Applied(next);
                advances.push(Advance {
                    lease: request.lease,
                    at: request.cursor,
                    parked_version: request.parked_version,
                    next,
                    applied,
                });
            }
        }
        tracing::debug!(
            consumer = name,
            queued = requests.len(),
            with_events = advances.len(),
            events = events.len(),
            limit,
            "group page"
        );
        if advances.is_empty() {
            return Ok(outcomes);
        }
        // Each partition's events are in log order; the page as a whole is too, so that a
        // consumer sees a group as it would one partition's page.
        events.sort_by_key(LogEvent::cursor);
        let span = tracing::info_span!(
            "consumer_page",
            consumer = name,
            partitions = advances.len(),
            events = events.len()
        );
        self.commit(&events, &advances).instrument(span).await?;
        Ok(outcomes)
    }

    /// The transaction of a group: as [`super::Worker::commit`]'s for one partition.
    async fn commit(&self, events: &[LogEvent], advances: &[Advance]) -> Result<(), String> {
        let name = self.consumer.name();
        self.consumer
            .deliver(events)
            .await
            .map_err(|e| e.to_string())?;
        let mut tx = begin_page(&self.pool, &*self.consumer, &self.config, true)
            .await
            .map_err(|e| e.to_string())?;
        crash::pause(&format!("before_page_lock:{name}")).await;
        self.freeze.thaw().await;
        self.consumer
            .apply(&mut tx, events)
            .await
            .map_err(|e| e.to_string())?;
        let all = checkpoints::advance_many_if_at(&mut tx, name, advances)
            .await
            .map_err(|e| e.to_string())?;
        if !all {
            return Err("a checkpoint moved or a lease was taken over meanwhile".into());
        }
        crash::point(&format!("before_checkpoint_commit:{name}"));
        tx.commit().await.map_err(|e| e.to_string())
    }
}
