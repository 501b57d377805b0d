//! The AMOSKYS operator: custom resource types (`EventBus`, `AgentSet`,
//! `Agent`, in `crd`), the pure builders that turn them into Kubernetes
//! objects (`build`), the certificate rotation schedule (`rotation`), the
//! reconcilers that apply them (`controller`) and the operator process
//! (`run`). Builders and the schedule do no I/O, so they are tested without
//! an API server.

// Every public item is documented, and stays so.
#![warn(missing_docs)]

pub mod build;
pub mod controller;
pub mod crd;
pub mod labels;
pub mod render;
pub mod rotation;
pub mod run;
