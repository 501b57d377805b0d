//! The AMOSKYS node agent: a spooling runtime that streams events to the bus
//! over mTLS, and the collectors that produce them.

// Every public item is documented, and stays so.
#![warn(missing_docs)]

pub mod collectors;
pub mod config;
pub mod fuzzing;
pub mod metrics;
pub mod pods;
pub mod runtime;
pub mod sender;
pub mod spool;

pub use config::{AgentConfig, AgentOverrides};
pub use runtime::{RunningAgent, start};
