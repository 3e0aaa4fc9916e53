//! Response frames round-trip: whatever the strings, `wire::encode_*` writes one
//! compact JSON line that `wire::Frame::parse` reads back to the same values.

use inferd_core::wire::{
    self, DoneFrame, ErrorCode, Frame, StopReason, Timings, Usage, write_json_str,
};
use proptest::prelude::*;
use serde_json::Value;

fn code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::QueueFull),
        Just(ErrorCode::BackendUnavailable),
        Just(ErrorCode::InvalidRequest),
        Just(ErrorCode::FrameTooLarge),
        Just(ErrorCode::Internal),
    ]
}

fn stop() -> impl Strategy<Value = StopReason> {
    prop_oneof![
        Just(StopReason::End),
        Just(StopReason::Length),
        Just(StopReason::Cancelled),
        Just(StopReason::Error),
    ]
}

/// Any string, with control characters, quotes and backslashes well represented.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[\\x00-\\x1f\"\\\\/a\u{7f}\u{2028}é🦀]{0,24}"]
}

/// One LF, at the end; the rest parses as a JSON object.
fn one_line(out: &[u8]) -> serde_json::Map<String, Value> {
    assert_eq!(out.last(), Some(&b'\n'));
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "raw LF inside the frame");
    assert!(out.iter().all(|&b| b >= 0x20 || b == b'\n'), "raw control byte in the frame");
    match serde_json::from_slice::<Value>(out) {
        Ok(Value::Object(m)) => m,
        other => panic!("not a JSON object: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn token_round_trips(id in text(), content in text()) {
        let mut out = Vec::new();
        wire::encode_token(&mut out, &id, &content);
        let m = one_line(&out);
        prop_assert_eq!(m.len(), 3);
        prop_assert_eq!(Frame::parse(&out).unwrap(), Frame::Token { id, content });
    }

    #[test]
    fn done_round_trips(
        id in text(),
        content in text(),
        backend in text(),
        usage in (any::<u32>(), any::<u32>()),
        stop_reason in stop(),
        timings in proptest::option::of((any::<u64>(), any::<u64>(), any::<u64>())),
    ) {
        let usage = Usage { prompt_tokens: usage.0, completion_tokens: usage.1 };
        let timings = timings.map(|(q, t, a)| Timings { queued_ms: q, ttft_ms: t, total_ms: a });
        let mut out = Vec::new();
        wire::encode_done(
            &mut out,
            &DoneFrame { id: &id, content: &content, usage, stop_reason, backend: &backend, timings },
        );
        let m = one_line(&out);
        prop_assert_eq!(m.contains_key("timings"), timings.is_some(), "timings left out when absent, never null");
        let f = Frame::parse(&out).unwrap();
        prop_assert!(f.is_terminal());
        prop_assert_eq!(f, Frame::Done { id, content, usage, stop_reason, backend, timings });
    }

    #[test]
    fn error_round_trips(id in text(), code in code(), message in text()) {
        let mut out = Vec::new();
        wire::encode_error(&mut out, &id, code, &message);
        one_line(&out);
        prop_assert_eq!(m_code(&out), code.as_str());
        prop_assert_eq!(Frame::parse(&out).unwrap(), Frame::Error { id, code, message });
    }

    #[test]
    fn json_strings_round_trip(s in text()) {
        let mut out = Vec::new();
        write_json_str(&mut out, &s);
        let back: String = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(back, s);
    }

    #[test]
    fn several_frames_split_back(frames in proptest::collection::vec((text(), text(), 0u8..3), 0..8)) {
        let mut out = Vec::new();
        for (id, s, kind) in &frames {
            match kind {
                0 => wire::encode_token(&mut out, id, s),
                1 => wire::encode_error(&mut out, id, ErrorCode::Internal, s),
                _ => wire::encode_done(&mut out, &DoneFrame {
                    id, content: s, usage: Usage::default(), stop_reason: StopReason::End,
                    backend: "b", timings: None,
                }),
            }
        }
        let lines: Vec<&[u8]> = out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        prop_assert_eq!(lines.len(), frames.len());
        for (line, (id, _, _)) in lines.iter().zip(&frames) {
            let f = Frame::parse(line).unwrap();
            let got = match f {
                Frame::Token { id, .. } | Frame::Done { id, .. } | Frame::Error { id, .. } => id,
                Frame::Unknown => panic!("unknown"),
            };
            prop_assert_eq!(&got, id);
        }
    }

    #[test]
    fn unknown_types_are_unknown(ty in "[a-z_]{1,12}", id in text()) {
        prop_assume!(!matches!(ty.as_str(), "token" | "done" | "error"));
        let v = serde_json::json!({"type": ty, "id": id, "extra": [1, 2]});
        prop_assert_eq!(Frame::parse(v.to_string().as_bytes()).unwrap(), Frame::Unknown);
    }
}

fn m_code(out: &[u8]) -> String {
    let v: Value = serde_json::from_slice(out).unwrap();
    v["code"].as_str().unwrap().to_owned()
}
