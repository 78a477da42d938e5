//! SETI@home-style batch work: uploaded JSONL files cut into work units, kept in a durable
//! SQLite store, run whole on nodes holding the model, validated by a quorum of agreeing
//! results, and credited to the nodes that computed them.

pub mod input;
pub mod scheduler;
pub mod store;

pub use scheduler::{Batches, DEFAULT_QUORUM};
pub use store::{BatchInfo, Credit, FileInfo, Kind, Store, StoreError, STORE_FILE};
