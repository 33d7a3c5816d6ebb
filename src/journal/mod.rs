//! The durable journal: shard streams → Postgres (`flusher`), and what reads it back:
//! usage queries (`usage`), the audit and the rebuild (`audit`).

pub mod audit;
pub mod entry;
pub mod flusher;
pub mod usage;
pub mod write;
