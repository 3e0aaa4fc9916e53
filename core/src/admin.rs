//! Admin status events (spec §5): the envelope `{"id":"admin","type":"status",…}`.
//!
//! Fields that do not apply are left out, never `null`, except a download's unknown
//! `total_bytes`.

use serde_json::{Map, Value};

use crate::engine::{Capabilities, LoadPhase};
use crate::wire::write_json_str;

/// The daemon's lifecycle state as the admin socket reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminState {
    /// Just started.
    Starting,
    /// Loading a backend, at this phase.
    LoadingModel(LoadPhase),
    /// Every backend is ready; the inference socket exists.
    Ready,
    /// Reloading a backend, at this phase.
    Restarting(LoadPhase),
    /// Shutting down.
    Draining,
}

fn envelope(status: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), "admin".into());
    m.insert("type".into(), "status".into());
    m.insert("status".into(), status.into());
    m
}

fn finish(out: &mut Vec<u8>, m: Map<String, Value>) {
    // Serializing a map of plain values cannot fail.
    if serde_json::to_writer(&mut *out, &Value::Object(m)).is_ok() {
        out.push(b'\n');
    }
}

fn merge(m: &mut Map<String, Value>, fields: impl serde::Serialize) {
    if let Ok(Value::Object(f)) = serde_json::to_value(fields) {
        m.extend(f);
    }
}

/// Appends a status event for `state`, with its LF.
pub fn encode_state(out: &mut Vec<u8>, state: &AdminState) {
    let m = match state {
        AdminState::Starting => envelope("starting"),
        AdminState::Ready => envelope("ready"),
        AdminState::Draining => envelope("draining"),
        AdminState::LoadingModel(p) => {
            let mut m = envelope("loading_model");
            merge(&mut m, p);
            m
        }
        AdminState::Restarting(p) => {
            let mut m = envelope("restarting");
            merge(&mut m, p);
            m
        }
    };
    finish(out, m);
}

/// Appends a `capabilities` event, with its LF.
pub fn encode_capabilities(out: &mut Vec<u8>, caps: &Capabilities) {
    let mut m = envelope("capabilities");
    merge(&mut m, caps);
    finish(out, m);
}

/// The counters of a `stats` event \[ours\].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsEvent<'a> {
    /// Requests waiting.
    pub queued: u32,
    /// Requests generating.
    pub active: u32,
    /// Open inference connections.
    pub connections: u32,
    /// Requests that ended with `done`.
    pub served: u64,
    /// Requests refused with `queue_full`.
    pub rejected: u64,
    /// Running total of prompt tokens of served requests.
    pub prompt_tokens: u64,
    /// Of those, tokens reused from an engine's prompt cache.
    pub prompt_cached_tokens: u64,
    /// Running total of completion tokens of served requests.
    pub completion_tokens: u64,
    /// Activity records lost to log write failures (a full disk, a file size limit).
    pub log_records_dropped: u64,
    /// Breaker state per backend name.
    pub breakers: Vec<(&'a str, &'static str)>,
}

/// Appends a `stats` event, with its LF.
pub fn encode_stats(out: &mut Vec<u8>, s: &StatsEvent<'_>) {
    use std::io::Write;
    let _ = write!(
        out,
        "{{\"id\":\"admin\",\"type\":\"status\",\"status\":\"stats\",\"queued\":{},\"active\":{},\"connections\":{},\"served\":{},\"rejected\":{},\"prompt_tokens\":{},\"prompt_cached_tokens\":{},\"completion_tokens\":{},\"log_records_dropped\":{},\"breakers\":{{",
        s.queued,
        s.active,
        s.connections,
        s.served,
        s.rejected,
        s.prompt_tokens,
        s.prompt_cached_tokens,
        s.completion_tokens,
        s.log_records_dropped
    );
    for (i, (name, state)) in s.breakers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(out, name);
        out.push(b':');
        write_json_str(out, state);
    }
    out.extend_from_slice(b"}}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(out: &[u8]) -> Value {
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(out).unwrap()
    }

    #[test]
    fn states_are_flat_and_never_null() {
        let mut out = Vec::new();
        encode_state(&mut out, &AdminState::LoadingModel(LoadPhase::Mmap { path: "/m".into() }));
        let v = parse(&out);
        assert_eq!(v["status"], "loading_model");
        assert_eq!(v["phase"], "mmap");
        assert_eq!(v["path"], "/m");
        assert_eq!(v["id"], "admin");
        out.clear();
        encode_state(&mut out, &AdminState::Ready);
        let v = parse(&out);
        assert_eq!(v.as_object().unwrap().len(), 3);
        assert!(!String::from_utf8_lossy(&out).contains("null"));
    }

    #[test]
    fn capabilities_and_stats() {
        let mut out = Vec::new();
        let mut caps = Capabilities::text_cpu();
        caps.backend = "mock".into();
        encode_capabilities(&mut out, &caps);
        let v = parse(&out);
        assert_eq!(v["status"], "capabilities");
        assert_eq!(v["backend"], "mock");
        assert_eq!(v["accelerator"], "cpu");
        assert_eq!(v["vision"], false);
        assert!(v.get("n_parallel").is_none(), "absent, never null");
        out.clear();
        caps.n_parallel = Some(4);
        caps.n_ctx = Some(512);
        encode_capabilities(&mut out, &caps);
        let v = parse(&out);
        assert_eq!(v["n_parallel"], 4);
        assert_eq!(v["n_ctx"], 512);
        out.clear();
        encode_stats(
            &mut out,
            &StatsEvent {
                queued: 1,
                active: 2,
                connections: 3,
                served: 4,
                rejected: 5,
                prompt_tokens: 6,
                prompt_cached_tokens: 7,
                completion_tokens: 8,
                log_records_dropped: 9,
                breakers: vec![("a", "open"), ("b", "closed")],
            },
        );
        let v = parse(&out);
        assert_eq!(v["status"], "stats");
        assert_eq!(v["breakers"]["a"], "open");
        assert_eq!(v["breakers"]["b"], "closed");
        assert_eq!(v["served"], 4);
        assert_eq!(v["prompt_tokens"], 6);
        assert_eq!(v["prompt_cached_tokens"], 7);
        assert_eq!(v["completion_tokens"], 8);
        assert_eq!(v["log_records_dropped"], 9);
    }
}
