//! The global log and its consumers.
//!
//! - [`reader`]: every event of every aggregate in an order that never skips one (the
//!   `(transaction_id, position)` cursor read below the oldest running transaction; ADR 2).
//! - [`checkpoints`]: the owner of the `checkpoints` table. Every statement on it lives there:
//!   the runner's, the rebuild's, the read-your-writes wait and the admin view.
//! - [`parked`]: the owner of `parked_keys`, the keys parked on a poison event, and the
//!   operators' retries and skips.
//! - [`partitions`]: how many partitions the log has, and splitting them (ADR 11).
//! - [`processes`]: the live processes that share the partitions.
//! - [`subscription`]: the checkpointed consumer runner (a lease and a worker per partition,
//!   the checkpoint moving in the transaction of the consumer's writes; ADR 5, 10, 11).
//! - [`crash`]: the one crash-test hook, read from one variable.

pub mod checkpoints;
pub mod crash;
pub mod parked;
pub mod partitions;
pub mod processes;
pub mod reader;
pub mod subscription;

pub use reader::{
    head_position, partition_of, read_page, read_partition, Cursor, LogEvent, HORIZON_SQL,
    LOG_EVENT_COLUMNS, NOTIFY_CHANNEL,
};
