//! The AMOSKYS EventBus: durable, mutually authenticated event ingest on
//! RocksDB, with query, live tail, an agent registry, metrics, and the client
//! library that agents and the CLI use.

pub mod alerts;
pub mod auth;
pub mod backup;
pub mod bench;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod filter;
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod phase;
pub mod pki;
pub mod registry;
pub mod render;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod writer;

pub use config::{BusConfig, SyncPolicy};
pub use server::{BusError, RunningBus, start};
