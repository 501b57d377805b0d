//! The AMOSKYS EventBus: durable, mutually authenticated event ingest on
//! RocksDB, with query, live tail, an agent registry, metrics and the
//! dashboard.
//!
//! The public surface is what the CLI runs (start a bus, its config, backups,
//! the load generator) and what the fuzz targets drive; everything else is
//! the bus's own. The client, TLS material, roles, PKI and value parsers it
//! shares with agents and the operator are in `amoskys-client`.

// Every public item is documented, and stays so.
#![warn(missing_docs)]

mod alerts;
mod auth;
pub mod backup;
pub mod bench;
pub mod config;
mod dashboard;
mod detect;
mod export;
mod fanout;
mod filter;
pub mod fuzzing;
mod http;
mod metrics;
mod registry;
mod server;
mod service;
mod shard;
mod sinks;
mod store;
mod tls;
mod writer;

pub use config::{BusConfig, SyncPolicy};
pub use dashboard::auth::ensure_token_file;
pub use server::{BusError, RunningBus, start};
pub use service::validate_batch;
pub use writer::now_ns;
