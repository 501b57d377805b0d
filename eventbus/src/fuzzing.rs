//! Entry points for the cargo-fuzz targets in `fuzz/`, one per parser of
//! bytes the bus does not control: Publish messages (decode and batch
//! validation), the dashboard's query strings and filters, and its config
//! file.
//!
//! They live in the crate so that `fuzz/corpus_replay.rs` replays every
//! corpus and every crash found through exactly this code on each
//! `cargo test`, without a fuzzing toolchain. Each must return normally for
//! any input: a panic, an overflow or an endless loop is the bug.

use amoskys_proto::publish_request::Msg;
use amoskys_proto::{Event, Hello, PublishRequest};
use prost::Message;

use crate::dashboard::params;
use crate::filter::EventFilter;

/// The batch limit the bus applies by default (`maxGroupEvents`).
const MAX_EVENTS: usize = 4096;

/// One Publish message off the wire, decoded and validated as a stream
/// does after its Hello; every event that passes is matched against a
/// filter, as Tail does.
pub fn publish(data: &[u8]) {
    let Ok(req) = PublishRequest::decode(data) else {
        return;
    };
    let hello = Hello {
        agent_id: "fuzz".into(),
        node: "node".into(),
        incarnation: 7,
        ..Default::default()
    };
    match req.msg {
        Some(Msg::Batch(mut batch)) => {
            // What passes validation is what Tail and the dashboard see.
            let stored = match crate::service::validate_batch(&hello, &mut batch, MAX_EVENTS) {
                Ok(()) => batch.events,
                Err(_) => Vec::new(),
            };
            let f = EventFilter::from_wire(None).unwrap_or_default();
            for e in &stored {
                let _ = (f.matches(e), amoskys_client::render::summary(e));
            }
        }
        Some(Msg::Hello(h)) => {
            let _ = crate::service::validate_hello(&h);
        }
        _ => {}
    }
}

/// A dashboard query string: the first byte picks the endpoint's parser;
/// a filter that parses is applied to an event decoded from the rest.
pub fn dashboard_query(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let raw = String::from_utf8_lossy(rest);
    let filter = match which % 3 {
        0 => params::search(Some(&raw)).map(|s| s.filter),
        1 => params::tail(Some(&raw)),
        _ => params::parse(Some(&raw), &["limit", "before"])
            .and_then(|p| params::number::<u64>("limit", p.get("limit")))
            .map(|_| EventFilter::default()),
    };
    if let Ok(f) = filter {
        let e = Event::decode(rest).unwrap_or_default();
        let _ = f.matches(&e);
    }
}

/// The bus's config file, parsed and resolved as `amoskys bus` does.
pub fn bus_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = crate::config::parse_config(text) else {
        return;
    };
    let flags = crate::config::BusOverrides {
        data_dir: Some("/nonexistent/data".into()),
        tls_dir: Some("/nonexistent/tls".into()),
        ..Default::default()
    };
    let _ = crate::config::resolve(file, flags);
}
