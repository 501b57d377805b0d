//! The AMOSKYS operator: custom resource types (`EventBus`, `AgentSet`,
//! `Agent`), the pure builders that turn them into Kubernetes objects, and
//! spec validation. Builders and validation do no I/O, so they are tested
//! without an API server.

pub mod agentset;
pub mod controller;
pub mod crd;
pub mod eventbus;
pub mod labels;
pub mod pki;
pub mod run;
