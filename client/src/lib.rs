//! What every AMOSKYS program that talks to the bus shares, without the bus
//! itself: the mTLS client and its publisher, the TLS material loader, roles
//! and certificate identities, the PKI that issues them, the config value
//! parsers, shard ownership, the agent phase rules, event rendering and token generation.
//!
//! Agents, the operator and the CLI depend on this crate; the bus does too,
//! for the halves it shares with them. Nothing here opens a store or serves.

#![warn(missing_docs)]

pub mod alerts;
pub mod bus;
pub mod identity;
pub mod parse;
pub mod phase;
pub mod pki;
pub mod render;
pub mod shard;
pub mod tls;
pub mod token;

pub use bus::{
    BusClient, ClientError, ClientOptions, Pems, Publisher, QueryPage, connect_channel,
    connect_channel_pem,
};
