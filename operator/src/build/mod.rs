//! The builders: pure functions from a custom resource to the Kubernetes
//! objects it becomes, with the spec validation they need. No I/O, so they
//! are tested without an API server; the reconcilers in `controller` apply
//! what they return.

pub mod agentset;
pub mod eventbus;
pub mod network;
pub mod rules;
