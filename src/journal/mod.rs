//! The durable journal: shard streams → Postgres (`flusher`), and what reads it back:
//! usage queries (`usage`), the audit and the rebuild (`audit`); monthly partitions and
//! retention of the Postgres table (`partitions`).

pub mod audit;
pub mod entry;
pub mod flusher;
pub mod partitions;
pub mod usage;
pub mod write;
