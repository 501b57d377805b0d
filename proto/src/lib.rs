//! The AMOSKYS wire contract: `amoskys.v1` messages and the `EventBus` and
//! `Admin` gRPC services, generated from `proto/amoskys/v1/*.proto`.

pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::doc_overindented_list_items)]
    tonic::include_proto!("amoskys.v1");
}

mod query_response;

pub use query_response::{EncodedEvents, QueryResponse};
pub use v1::*;
